//! The files in `deploy/`: each init system's command line, run as written (without the init
//! system) against the test etcd, parses and starts what it says it starts.
//!
//! What is replaced, and only that: `/usr/local/bin/conch` by the binary under test; the
//! example's etcd endpoints, TLS files and user by the test server's; the cgroup root by the
//! test's own (the units' own value is checked first); a status address by a free port.
//! `chpst` (runit) and `chown` are stand-ins on PATH: the first applies `-e DIR` as runit's
//! does and ignores `-u`, the second does nothing (there is no `conch` user here).

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Ctx, Signal, etcd::free_port, proc, wait_for, wait_until};

const SOON: Duration = Duration::from_secs(10);
const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");
const INSTALLED: &str = "/usr/local/bin/conch";
/// Where a started service's output goes, in the test's scratch directory.
const LOG: &str = "service.log";

fn conch_bin() -> &'static str {
    env!("CARGO_BIN_EXE_conch")
}

fn read(rel: &str) -> String {
    let path = Path::new(DEPLOY).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------
// systemd: unit files and environment files, read the way systemd reads them

/// `[Section] Key=Value` entries in file order (keys may repeat, as `EnvironmentFile=` does).
fn unit_entries(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_string();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not Key=Value in a unit file: {line:?}"));
        assert!(
            !line.ends_with('\\'),
            "continuation lines are not expected: {line:?}"
        );
        out.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
    }
    out
}

fn unit_values(entries: &[(String, String, String)], section: &str, key: &str) -> Vec<String> {
    entries
        .iter()
        .filter(|(s, k, _)| s == section && k == key)
        .map(|(_, _, v)| v.clone())
        .collect()
}

fn unit_value(entries: &[(String, String, String)], section: &str, key: &str) -> String {
    let v = unit_values(entries, section, key);
    assert_eq!(v.len(), 1, "[{section}] {key}= set {} times", v.len());
    v[0].clone()
}

/// systemd's specifiers used in these units: `%i`, `%I` (the instance), `%n` (the unit).
fn specifiers(s: &str, instance: &str, unit: &str) -> String {
    s.replace("%%", "\u{0}")
        .replace("%i", instance)
        .replace("%I", instance)
        .replace("%n", unit)
        .replace('\u{0}', "%")
}

/// An environment file (`EnvironmentFile=`): `KEY=VALUE` lines, `#` comments, optional quotes.
fn env_file(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not KEY=VALUE in an environment file: {line:?}"));
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v);
        out.insert(k.trim().to_string(), v.to_string());
    }
    out
}

/// `ExecStart=` split into words the way systemd does for these lines: words on white space;
/// a word that is exactly `$VAR` becomes the value's white-space separated words, `${VAR}`
/// one word.
fn exec_words(line: &str, env: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for w in line.split_whitespace() {
        assert!(
            !w.contains('"') && !w.contains('\''),
            "quoted words are not expected here: {line:?}"
        );
        if let Some(name) = w.strip_prefix("${").and_then(|w| w.strip_suffix('}')) {
            out.push(env.get(name).cloned().unwrap_or_default());
        } else if let Some(name) = w.strip_prefix('$') {
            let v = env.get(name).unwrap_or_else(|| panic!("{name} is not set"));
            out.extend(v.split_whitespace().map(str::to_string));
        } else {
            out.push(w.to_string());
        }
    }
    out
}

/// Keep the production-only settings of an example out of a test run: endpoints, TLS, user.
fn without_production(env: &mut BTreeMap<String, String>) {
    for k in [
        "CONCH_ENDPOINTS",
        "CONCH_CACERT",
        "CONCH_CERT",
        "CONCH_KEY",
        "CONCH_USER",
        "CONCH_PASSWORD_FILE",
        "CONCH_CGROUP_ROOT",
    ] {
        env.remove(k);
    }
}

/// A command with the test's own settings (etcd, prefix, cgroup root, the process tag).
fn test_command(ctx: &Ctx, program: &str) -> Command {
    let mut cmd = ctx.command(program);
    cmd.stdin(Stdio::null());
    cmd
}

/// Like [`test_command`], its output going to `<dir>/<log>` (never a pipe nobody reads).
fn logged(ctx: &Ctx, program: &str, log: &str) -> Command {
    let mut cmd = test_command(ctx, program);
    let f = std::fs::File::create(ctx.path(log)).expect("create the log file");
    cmd.stdout(f.try_clone().unwrap()).stderr(f);
    cmd
}

/// Kills what is left of `child` and returns its log, for a failure message.
fn failed(ctx: &Ctx, child: &mut Child, log: &str) -> String {
    let _ = child.kill();
    let _ = child.wait();
    ctx.read(log).unwrap_or_default()
}

/// The service's command: writes what it got and how it was started, then runs until killed.
fn write_app(ctx: &Ctx) -> PathBuf {
    let path = ctx.path("myapp");
    let script = format!(
        "#!/bin/sh\nprintf '%s\\n' \"$CONCH_NAME\" \"$*\" \"$CONCH_LEASE\" > {dir}/app.tmp\n\
         mv {dir}/app.tmp {dir}/app.out\nexec sleep 1000\n",
        dir = ctx.dir.display()
    );
    std::fs::write(&path, script).expect("write the app script");
    let mut perm = std::fs::metadata(&path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&path, perm).unwrap();
    path
}

/// What the app wrote: office (CONCH_NAME), its arguments, the lease (hex).
fn app_saw(ctx: &Ctx, conch: &mut Child) -> (String, String, String) {
    let mut exited = None;
    let out = wait_for(SOON, || {
        if let Ok(Some(status)) = conch.try_wait() {
            exited = Some(status);
            return Some(String::new());
        }
        ctx.read("app.out").filter(|s| s.ends_with('\n'))
    });
    let out = match (out, exited) {
        (Some(out), None) => out,
        (_, exited) => panic!(
            "the app never ran (conch: {exited:?}):\n{}",
            failed(ctx, conch, LOG)
        ),
    };
    let f: Vec<&str> = out.lines().collect();
    assert_eq!(f.len(), 3, "app output: {out:?}");
    (f[0].to_string(), f[1].to_string(), f[2].to_string())
}

/// SIGTERM, as every init system stops a service; returns the exit code.
fn stop(child: &mut Child) -> i32 {
    proc::signal(child.id() as i32, Signal::TERM);
    let deadline = Instant::now() + SOON;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.code().unwrap_or(-1);
        }
        assert!(
            Instant::now() < deadline,
            "did not stop within {SOON:?} of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The elect service holds the office named after its instance, runs the configured command
/// under the configured TTL, and on SIGTERM stops it (exit 143: the command's SIGTERM) and
/// releases the office.
fn check_elect_run(ctx: &Ctx, office: &str, mut conch: Child, ttl_s: u64) {
    let (name, args, lease) = app_saw(ctx, &mut conch);
    assert_eq!(name, office, "the office is the instance's name");
    assert_eq!(args, "--serve", "the command's arguments as configured");
    let keys = ctx.office_keys(office);
    assert_eq!(keys.len(), 1, "one candidate key: {keys:?}");
    assert_eq!(
        format!("{:016x}", keys[0].lease),
        lease,
        "the app runs under the key's lease"
    );
    let ttl = ctx.etcd.ctl(["lease", "timetolive", &lease]);
    assert!(
        ttl.contains(&format!("granted with TTL({ttl_s}s)")),
        "CONCH_TTL from the settings file: {ttl}"
    );
    assert_eq!(stop(&mut conch), 143, "the command's own end (SIGTERM)");
    assert!(
        wait_until(SOON, || ctx.office_keys(office).is_empty()),
        "the office was not released: {:?}",
        ctx.office_keys(office)
    );
}

#[test]
fn systemd_elect_template_runs_the_instance_on_one_node() {
    let ctx = Ctx::new("deploy-systemd-elect");
    let unit = unit_entries(&read("systemd/conch-elect@.service"));
    let instance = "web";
    let unit_name = format!("conch-elect@{instance}.service");

    // What makes it "exactly one node, whole tree": checked as written.
    assert_eq!(unit_value(&unit, "Service", "KillMode"), "control-group");
    assert_eq!(unit_value(&unit, "Service", "Restart"), "always");
    assert_eq!(unit_value(&unit, "Service", "Delegate"), "yes");
    assert_eq!(unit_value(&unit, "Service", "Slice"), "system.slice");

    let mut env = BTreeMap::new();
    for e in unit_values(&unit, "Service", "Environment") {
        let (k, v) = e.split_once('=').expect("Environment=KEY=VALUE");
        env.insert(k.to_string(), specifiers(v, instance, &unit_name));
    }
    assert_eq!(
        env.get("CONCH_CGROUP_ROOT").map(String::as_str),
        Some("system.slice/conch-elect@web.service"),
        "the delegated cgroup of the instance (relative to the cgroup v2 mount)"
    );
    let files: Vec<String> = unit_values(&unit, "Service", "EnvironmentFile")
        .iter()
        .map(|f| specifiers(f, instance, &unit_name))
        .collect();
    assert_eq!(
        files,
        ["-/etc/conch/elect.env", "/etc/conch/elect/web.env"],
        "shared settings (optional), then the instance's"
    );
    // The instance's file, from the example, with the command pointed at the test's app.
    let mut inst = env_file(&read("systemd/conch-elect.env.example"));
    let app = write_app(&ctx);
    let example_cmd = inst.insert("ELECT_COMMAND".into(), format!("{} --serve", app.display()));
    assert_eq!(example_cmd.as_deref(), Some("/usr/local/bin/myapp --serve"));
    env.extend(inst);
    without_production(&mut env);

    let exec = specifiers(
        &unit_value(&unit, "Service", "ExecStart"),
        instance,
        &unit_name,
    );
    let words = exec_words(&exec, &env);
    assert_eq!(words[0], INSTALLED);
    let mut cmd = logged(&ctx, conch_bin(), LOG);
    cmd.args(&words[1..]).envs(&env);
    let conch = cmd.spawn().expect("start conch");
    let ttl: u64 = env["CONCH_TTL"].trim_end_matches('s').parse().unwrap();
    check_elect_run(&ctx, instance, conch, ttl);
}

/// Receives sd_notify datagrams sent to `NOTIFY_SOCKET`.
struct Notify {
    sock: UnixDatagram,
    path: PathBuf,
}

impl Notify {
    fn new(ctx: &Ctx) -> Notify {
        let path = ctx.path("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Notify { sock, path }
    }

    /// Waits for a message with the line `line`; gives up at `SOON` or when `child` exits.
    fn wait(&self, line: &str, child: &mut Child) -> bool {
        let deadline = Instant::now() + SOON;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            if let Ok(n) = self.sock.recv(&mut buf)
                && String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == line)
            {
                return true;
            }
        }
        false
    }
}

#[test]
fn systemd_conchd_unit_starts_ready_and_pings_its_watchdog() {
    let ctx = Ctx::new("deploy-systemd-conchd");
    let unit = unit_entries(&read("systemd/conchd.service"));
    assert_eq!(unit_value(&unit, "Service", "Type"), "notify");
    assert_eq!(unit_value(&unit, "Service", "KillMode"), "control-group");
    let watchdog = unit_value(&unit, "Service", "WatchdogSec");
    let mut env = env_file(&read("systemd/conchd.env.example"));
    for e in unit_values(&unit, "Service", "Environment") {
        let (k, v) = e.split_once('=').expect("Environment=KEY=VALUE");
        env.insert(k.to_string(), v.to_string());
    }
    without_production(&mut env);
    let status_example = env.insert(
        "CONCH_STATUS_ADDR".into(),
        format!("127.0.0.1:{}", free_port()),
    );
    assert_eq!(
        status_example.as_deref(),
        Some("127.0.0.1:7480"),
        "loopback in the example"
    );
    let words = exec_words(&unit_value(&unit, "Service", "ExecStart"), &env);
    assert_eq!(words, [INSTALLED, "conchd"]);

    let notify = Notify::new(&ctx);
    let mut cmd = logged(&ctx, conch_bin(), LOG);
    cmd.args(&words[1..])
        .envs(&env)
        .env("NOTIFY_SOCKET", &notify.path)
        // What systemd sets for WatchdogSec=30s, shortened so a ping comes within the test.
        .env("WATCHDOG_USEC", "1000000");
    let mut conchd = cmd.spawn().expect("start conchd");
    if !notify.wait("READY=1", &mut conchd) {
        panic!(
            "no READY=1 (Type=notify):\n{}",
            failed(&ctx, &mut conchd, LOG)
        );
    }
    if !notify.wait("WATCHDOG=1", &mut conchd) {
        panic!(
            "no watchdog ping (WatchdogSec={watchdog}):\n{}",
            failed(&ctx, &mut conchd, LOG)
        );
    }
    assert_eq!(stop(&mut conchd), 0, "conchd drains and exits 0 on SIGTERM");
    let log = ctx.read(LOG).unwrap_or_default();
    let first = log.lines().next().unwrap_or_default();
    assert!(
        serde_json::from_str::<serde_json::Value>(first).is_ok(),
        "CONCH_LOG_FORMAT=json from the example: {first:?}"
    );
}

// ---------------------------------------------------------------------------------------
// OpenRC and runit: shell scripts, run by sh with the installed path replaced

/// A copy of a deploy script with `/usr/local/bin/conch` replaced by the binary under test.
fn installed_copy(rel: &str, dest: &Path) -> PathBuf {
    let text = read(rel).replace(INSTALLED, conch_bin());
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::write(dest, text).unwrap();
    dest.to_path_buf()
}

/// Writes an executable file.
fn executable(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    let mut perm = std::fs::metadata(path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(path, perm).unwrap();
}

/// `chpst` and `chown` stand-ins in `<dir>/bin`, first on PATH.
fn stand_ins(ctx: &Ctx) -> String {
    let bin = ctx.path("bin");
    std::fs::create_dir_all(&bin).unwrap();
    // runit's chpst -e DIR: each file names a variable, its first line is the value (an empty
    // file removes it); -u USER[:GROUP] would drop privileges (ignored here).
    let chpst = "#!/bin/sh\nwhile [ $# -gt 0 ]; do case \"$1\" in\n\
                 -u) shift 2 ;;\n\
                 -e) for f in \"$2\"/*; do [ -e \"$f\" ] || continue; n=${f##*/}; if [ -s \"$f\" ]; then \
                 v=$(head -n 1 \"$f\"); export \"$n=$v\"; else unset \"$n\"; fi; done; shift 2 ;;\n\
                 *) break ;;\nesac; done\nexec \"$@\"\n";
    for (name, body) in [("chpst", chpst), ("chown", "#!/bin/sh\nexit 0\n")] {
        executable(&bin.join(name), body);
    }
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// Runs an OpenRC script the way openrc-run does for `start`: its conf.d file sourced first,
/// then the script, `start_pre`, and `$command $command_args`. `overrides` are exported after
/// the conf.d file (the operator's edits).
fn openrc(ctx: &Ctx, script: &str, confd: &str, svcname: &str, overrides: &str) -> Command {
    let copy = installed_copy(script, &ctx.path(&format!("init.d/{svcname}")));
    let conf = ctx.path(&format!("conf.d/{svcname}"));
    std::fs::create_dir_all(conf.parent().unwrap()).unwrap();
    std::fs::write(&conf, read(confd)).unwrap();
    let driver = format!(
        "eerror() {{ echo \"ERROR: $*\" >&2; }}; checkpath() {{ :; }}\n\
         . '{conf}'\n{overrides}\nRC_SVCNAME='{svcname}'\n. '{copy}'\n\
         start_pre || exit 1\nexec $command $command_args\n",
        conf = conf.display(),
        copy = copy.display(),
    );
    let mut cmd = logged(ctx, "sh", LOG);
    cmd.args(["-c", &driver]).env("PATH", stand_ins(ctx));
    cmd
}

/// The operator's settings for a test run: the test's etcd and cgroup root.
fn test_overrides(ctx: &Ctx, extra: &str) -> String {
    let mut s = format!(
        "export CONCH_ENDPOINTS='{}' CONCH_PREFIX='{}'\n\
         unset CONCH_CACERT CONCH_CERT CONCH_KEY CONCH_USER CONCH_PASSWORD_FILE\n",
        ctx.etcd.endpoint, ctx.prefix
    );
    if let Some(root) = &ctx.cgroup_root {
        s.push_str(&format!("export CONCH_CGROUP_ROOT='{}'\n", root.display()));
    }
    s.push_str(extra);
    s
}

#[test]
fn openrc_elect_runs_the_office_named_by_its_symlink() {
    let ctx = Ctx::new("deploy-openrc-elect");
    let app = write_app(&ctx);
    let overrides = test_overrides(
        &ctx,
        &format!("ELECT_COMMAND='{} --serve'\n", app.display()),
    );
    let conch = openrc(
        &ctx,
        "openrc/conch-elect",
        "openrc/conch-elect.confd",
        "conch-elect.api",
        &overrides,
    )
    .spawn()
    .expect("sh");
    // The conf.d example's TTL: 15s.
    check_elect_run(&ctx, "api", conch, 15);
}

#[test]
fn openrc_elect_refuses_to_start_without_an_office_or_a_command() {
    let ctx = Ctx::new("deploy-openrc-elect-bad");
    let overrides = test_overrides(&ctx, "");
    let status = openrc(
        &ctx,
        "openrc/conch-elect",
        "openrc/conch-elect.confd",
        "conch-elect",
        &overrides,
    )
    .status()
    .unwrap();
    assert_eq!(status.code(), Some(1));
    let err = ctx.read(LOG).unwrap_or_default();
    assert!(err.contains("conch-elect.NAME"), "names the fix: {err}");
    let status = openrc(
        &ctx,
        "openrc/conch-elect",
        "openrc/conch-elect.confd",
        "conch-elect.api",
        &test_overrides(&ctx, "ELECT_COMMAND=''\n"),
    )
    .status()
    .unwrap();
    assert_eq!(status.code(), Some(1));
    let err = ctx.read(LOG).unwrap_or_default();
    assert!(err.contains("ELECT_COMMAND"), "names the setting: {err}");
    assert!(ctx.keys().is_empty(), "nothing written: {:?}", ctx.keys());
}

#[test]
fn openrc_conchd_starts_and_stops_cleanly() {
    let ctx = Ctx::new("deploy-openrc-conchd");
    let overrides = test_overrides(
        &ctx,
        &format!("export CONCH_STATUS_ADDR='127.0.0.1:{}'\n", free_port()),
    );
    let mut conchd = openrc(
        &ctx,
        "openrc/conchd",
        "openrc/conchd.confd",
        "conchd",
        &overrides,
    )
    .spawn()
    .expect("sh");
    wait_registered(&ctx, &mut conchd);
    assert_eq!(stop(&mut conchd), 0);
}

/// Waits until a conchd under this test's prefix has registered its node.
fn wait_registered(ctx: &Ctx, conchd: &mut Child) {
    let nodes = format!("{}/v1/node/", ctx.prefix);
    let ok = wait_until(SOON, || {
        matches!(conchd.try_wait(), Ok(None)) && !ctx.etcd.get_prefix(&nodes).is_empty()
    });
    if !ok {
        panic!(
            "conchd never registered under {nodes}:\n{}",
            failed(ctx, conchd, LOG)
        );
    }
}

/// A runit service directory `<dir>/sv/<name>` with the run script and an `env/` directory.
fn runit_service(ctx: &Ctx, rel: &str, name: &str, env: &[(&str, String)]) -> PathBuf {
    let dir = ctx.path(&format!("sv/{name}"));
    installed_copy(rel, &dir.join("run"));
    let envdir = dir.join("env");
    std::fs::create_dir_all(&envdir).unwrap();
    for (k, v) in env {
        std::fs::write(envdir.join(k), format!("{v}\n")).unwrap();
    }
    dir
}

fn runit_env(ctx: &Ctx) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("CONCH_ENDPOINTS", ctx.etcd.endpoint.clone()),
        ("CONCH_PREFIX", ctx.prefix.clone()),
        ("CONCH_TTL", "12s".to_string()),
    ];
    if let Some(root) = &ctx.cgroup_root {
        env.push(("CONCH_CGROUP_ROOT", root.display().to_string()));
    }
    env
}

/// `./run` in a service directory as runsv starts it: with a clean environment (none of
/// `env`'s variables, which the script gets from its `env/` directory), the stand-ins on PATH.
fn runsv(ctx: &Ctx, dir: &Path, env: &[(&str, String)]) -> Command {
    let mut cmd = logged(ctx, "sh", LOG);
    cmd.arg("./run")
        .current_dir(dir)
        .env("PATH", stand_ins(ctx));
    for (k, _) in env {
        cmd.env_remove(k);
    }
    cmd
}

/// [`runit_service`] for conchd, whose run script reads `/etc/sv/conchd/env`: pointed at the
/// service's own `env/`.
fn conchd_runit_service(ctx: &Ctx, name: &str, env: &[(&str, String)]) -> PathBuf {
    let dir = runit_service(ctx, "runit/conchd/run", name, env);
    let run = dir.join("run");
    let text = std::fs::read_to_string(&run).unwrap();
    assert!(text.contains("/etc/sv/conchd/env"));
    std::fs::write(
        &run,
        text.replace("/etc/sv/conchd/env", &dir.join("env").display().to_string()),
    )
    .unwrap();
    dir
}

#[test]
fn runit_elect_runs_the_office_named_by_its_directory() {
    let ctx = Ctx::new("deploy-runit-elect");
    let app = write_app(&ctx);
    let mut env = runit_env(&ctx);
    env.push(("ELECT_COMMAND", format!("{} --serve", app.display())));
    let dir = runit_service(&ctx, "runit/conch-elect/run", "conch-elect-batch", &env);
    let conch = runsv(&ctx, &dir, &env).spawn().expect("sh");
    check_elect_run(&ctx, "batch", conch, 12);
}

#[test]
fn runit_elect_refuses_a_directory_without_a_name_or_a_command() {
    let ctx = Ctx::new("deploy-runit-elect-bad");
    for (name, env, says) in [
        ("conch-elect", runit_env(&ctx), "conch-elect-NAME"),
        ("conch-elect-x", runit_env(&ctx), "ELECT_COMMAND"),
    ] {
        let dir = runit_service(&ctx, "runit/conch-elect/run", name, &env);
        let status = runsv(&ctx, &dir, &[]).status().unwrap();
        assert_eq!(status.code(), Some(1), "{name}");
        let said = ctx.read(LOG).unwrap_or_default();
        assert!(said.contains(says), "{name}: {said}");
    }
    assert!(ctx.keys().is_empty(), "nothing written: {:?}", ctx.keys());
}

#[test]
fn runit_conchd_starts_and_stops_cleanly() {
    let ctx = Ctx::new("deploy-runit-conchd");
    let mut env = runit_env(&ctx);
    env.push(("CONCH_STATUS_ADDR", format!("127.0.0.1:{}", free_port())));
    let dir = conchd_runit_service(&ctx, "conchd", &env);
    let mut conchd = runsv(&ctx, &dir, &env).spawn().expect("sh");
    wait_registered(&ctx, &mut conchd);
    assert_eq!(stop(&mut conchd), 0);
}

/// Without a `CONCH_CGROUP_ROOT` setting, the conchd scripts hand the conch user
/// `<cgroup v2 mount>/conch.slice` — wherever the v2 mount is (`/sys/fs/cgroup/unified` on a
/// hybrid host) — and a relative setting is taken below the mount, as conch itself does; the
/// path they prepare is the one conchd is given. Run up to the `exec` of conchd: `mkdir`,
/// `chown` and the final command are stand-ins that record what they were asked to do.
#[test]
fn conchd_scripts_prepare_the_cgroup_root_conch_uses_wherever_the_v2_mount_is() {
    let ctx = Ctx::new("deploy-conchd-root");
    let Some(mount) = crate::harness::cgroup::v2_mount() else {
        eprintln!("no cgroup v2 mount: skipped");
        return;
    };
    let said = ctx.path("said");
    let rec = ctx.path("rec");
    std::fs::create_dir_all(&rec).unwrap();
    let record = |name: &str, body: &str| {
        executable(&rec.join(name), &format!("#!/bin/sh\n{body}\n"));
    };
    let log = format!("'{}'", said.display());
    record("mkdir", &format!("echo \"mkdir $*\" >> {log}"));
    record("chown", &format!("echo \"chown $*\" >> {log}"));
    // conchd itself: what it was started with.
    record(
        "conch",
        &format!("echo \"conch $* root=$CONCH_CGROUP_ROOT\" >> {log}"),
    );
    let path = format!("{}:{}", rec.display(), stand_ins(&ctx));
    let conch = rec.join("conch").display().to_string();
    for (n, (setting, want)) in [
        (None, mount.join("conch.slice")),
        (Some("jobs.slice/conchd"), mount.join("jobs.slice/conchd")),
        (Some("/somewhere/else"), PathBuf::from("/somewhere/else")),
    ]
    .into_iter()
    .enumerate()
    {
        let want = want.display();
        let expect =
            format!("mkdir -p {want}\nchown -R conch:conch {want}\nconch conchd root={want}\n");
        let stand_in_conch = |script: &Path| {
            let text = std::fs::read_to_string(script).unwrap();
            std::fs::write(script, text.replace(conch_bin(), &conch)).unwrap();
        };

        // OpenRC: conf.d, the operator's setting, the script, start_pre, the command.
        let _ = std::fs::remove_file(&said);
        let svc = format!("conchd{n}");
        let setting_sh = setting.map_or("unset CONCH_CGROUP_ROOT".into(), |r| {
            format!("export CONCH_CGROUP_ROOT='{r}'")
        });
        let mut cmd = openrc(
            &ctx,
            "openrc/conchd",
            "openrc/conchd.confd",
            &svc,
            &setting_sh,
        );
        stand_in_conch(&ctx.path(&format!("init.d/{svc}")));
        let status = cmd.env("PATH", &path).status().unwrap();
        assert_eq!(status.code(), Some(0), "OpenRC, {setting:?}");
        assert_eq!(
            ctx.read("said").unwrap_or_default(),
            expect,
            "OpenRC, {setting:?}"
        );

        // runit: the setting in env/, as an operator writes it.
        let _ = std::fs::remove_file(&said);
        let env: Vec<(&str, String)> = setting
            .map(|r| ("CONCH_CGROUP_ROOT", r.to_string()))
            .into_iter()
            .collect();
        let dir = conchd_runit_service(&ctx, &svc, &env);
        stand_in_conch(&dir.join("run"));
        let status = runsv(&ctx, &dir, &[("CONCH_CGROUP_ROOT", String::new())])
            .env("PATH", &path)
            .status()
            .unwrap();
        assert_eq!(status.code(), Some(0), "runit, {setting:?}");
        assert_eq!(
            ctx.read("said").unwrap_or_default(),
            expect,
            "runit, {setting:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The etcd role script

#[test]
fn etcd_role_script_grants_exactly_the_prefix_and_is_safe_to_repeat() {
    let ctx = Ctx::new("deploy-etcd-role");
    let etcdctl = ctx.etcd.etcdctl_bin.display().to_string();
    let user = format!("conch-{}", ctx.tag);
    let prefix = ctx.prefix.clone();
    let run = |args: &[&str]| {
        let out = Command::new("sh")
            .arg(Path::new(DEPLOY).join("etcd-role.sh"))
            .args(args)
            .env("ETCDCTL", &etcdctl)
            .env("ETCDCTL_ENDPOINTS", &ctx.etcd.endpoint)
            .env("CONCH_NEW_PASSWORD", "s3cret-for-test")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let cleanup = || {
        for what in ["user", "role"] {
            let _ = Command::new(&etcdctl)
                .arg(format!("--endpoints={}", ctx.etcd.endpoint))
                .args([what, "delete", &user])
                .output();
        }
    };
    for round in 0..2 {
        let (code, out, err) = run(&[&prefix, &user]);
        if code != Some(0) {
            cleanup();
            panic!("round {round}: exit {code:?}\n{out}\n{err}");
        }
        // etcdctl prints each range as [start, end): the prefix and the key just past it,
        // once under "KV Read:" and once under "KV Write:", and nothing else.
        let want = format!("[{prefix}/, {prefix}0)");
        let ranges: Vec<&str> = out
            .lines()
            .filter(|l| l.trim_start().starts_with('['))
            .collect();
        if ranges.len() != 2 || !ranges.iter().all(|l| l.contains(&want)) {
            cleanup();
            panic!("round {round}: want read and write on {want} only:\n{out}");
        }
    }
    let roles = ctx.etcd.ctl(["user", "get", &user]);
    cleanup();
    assert!(roles.contains(&user), "the user has the role: {roles}");
    let (code, _, err) = run(&["relative/prefix", &user]);
    assert_eq!(
        code,
        Some(64),
        "a prefix without a leading / is refused: {err}"
    );
    assert!(err.contains("must start with /"), "{err}");
}
