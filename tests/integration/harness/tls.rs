//! A second etcd, for the TLS tests: mutual TLS (`--client-cert-auth`) with a CA made for this
//! test binary, and etcd auth on, as a Kubernetes control plane's etcd runs.
//!
//! Started lazily by the first test that asks for it and killed with the test binary
//! (PDEATHSIG from a keeper thread that parks forever, as in `etcd.rs`). Certificates are made
//! per run with `rcgen`: a CA, the server's certificate (SAN 127.0.0.1 and localhost), client
//! certificates, and an unrelated second CA with a client certificate of its own.
//!
//! Users: `root` (the harness's own `etcdctl`), [`USER`] whose role gets readwrite on each
//! test's prefix ([`ctx`] grants it) and nothing else, and [`OUTSIDER`] whose role may only
//! touch [`OUTSIDER_PREFIX`]. With `--client-cert-auth`, etcd takes a certificate's CN as the
//! user name when a request carries no password token: so the ordinary client certificate's CN
//! ([`CLIENT_CN`]) is *not* a user, or every test would pass on the certificate alone whatever
//! conch did with the password; only [`Pki::cn_cert`] names [`USER`], for the test of exactly
//! that mode.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use super::{Ctx, Etcd, cgroup, etcd};

/// The limited user conch runs as.
pub const USER: &str = "conch";
/// [`USER`]'s password: distinctive, so a test can look for it anywhere.
pub const PASSWORD: &str = "pw-Conch-9d2f7a61e0";
/// A user whose role covers only [`OUTSIDER_PREFIX`].
pub const OUTSIDER: &str = "outsider";
pub const OUTSIDER_PASSWORD: &str = "pw-Outsider-4b8e03c5aa";
pub const OUTSIDER_PREFIX: &str = "/elsewhere/";
/// The CN of the ordinary client certificate: not an etcd user.
pub const CLIENT_CN: &str = "conch-client";
const ROOT_PASSWORD: &str = "pw-Root-71c0e4d2bb";

/// The files of this run's PKI, all PEM.
#[derive(Debug, Clone)]
pub struct Pki {
    pub dir: PathBuf,
    /// The CA that signed the server's and the clients' certificates.
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// CN [`CLIENT_CN`] (no such user), signed by [`Pki::ca`].
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// CN [`USER`], signed by [`Pki::ca`]: etcd takes it as that user when no password is sent.
    pub cn_cert: PathBuf,
    pub cn_key: PathBuf,
    /// An unrelated CA, and a client certificate (CN [`USER`]) it signed.
    pub rogue_ca: PathBuf,
    pub rogue_cert: PathBuf,
    pub rogue_key: PathBuf,
}

/// The TLS server.
#[derive(Debug)]
pub struct TlsEtcd {
    /// `https://127.0.0.1:<port>`
    pub endpoint: String,
    pub pki: Pki,
    /// The same server as a harness [`Etcd`], whose `etcdctl` is a wrapper that speaks mutual
    /// TLS as `root`: a [`Ctx`] from [`ctx`] reads keys through it as usual.
    pub etcd: &'static Etcd,
}

static SERVER: OnceLock<TlsEtcd> = OnceLock::new();
static NEXT: AtomicUsize = AtomicUsize::new(1);

/// The TLS server, started on first use.
pub fn server() -> &'static TlsEtcd {
    SERVER.get_or_init(start)
}

/// A test context on the TLS server: its own prefix `/t/<name>-tls<n>`, on which [`USER`]'s
/// role is granted readwrite (and on nothing else of it). `ctx.conch()` gets the https
/// endpoint; the test adds certificates and credentials.
pub fn ctx(name: &str) -> Ctx {
    let srv = server();
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let pid = std::process::id();
    let dir = super::base_dir().join(format!("{name}-tls{n}"));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let prefix = format!("/t/{name}-tls{n}");
    srv.etcd.ctl([
        "role",
        "grant-permission",
        USER,
        "readwrite",
        "--prefix=true",
        &format!("{prefix}/"),
    ]);
    Ctx {
        name: name.to_string(),
        prefix,
        dir,
        cgroup_root: cgroup::v2_mount().map(|m| m.join(format!("conch-test-{pid}-tls{n}"))),
        tag: format!("{pid}-tls{n}"),
        etcd: srv.etcd,
    }
}

fn start() -> TlsEtcd {
    let (etcd_bin, etcdctl_bin) = etcd::find_binaries();
    let dir = super::base_dir().join("tls-etcd");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let pki = make_pki(&dir.join("pki"));
    let wrapper = dir.join("etcdctl-root");
    write_ctl_wrapper(&wrapper, &etcdctl_bin, &pki);
    let version = etcd::version_of(&etcd_bin);
    let (bin, d, p) = (etcd_bin.clone(), dir.clone(), pki.clone());
    let endpoint = etcd::keep_server("tls-etcd-keeper", move || {
        let mut last = String::new();
        for attempt in 0..3 {
            match start_once(&bin, &etcdctl_bin, &d, &p, attempt) {
                Ok(started) => return Ok(started),
                Err(e) => last = e,
            }
        }
        Err(last)
    })
    .unwrap_or_else(|e| panic!("cannot start the TLS etcd: {e}"));
    let etcd: &'static Etcd = Box::leak(Box::new(Etcd {
        endpoint: endpoint.clone(),
        etcd_bin,
        etcdctl_bin: wrapper,
        version,
        data_dir: dir.join("data"),
    }));
    enable_auth(etcd);
    TlsEtcd {
        endpoint,
        pki,
        etcd,
    }
}

/// `etcdctl` speaking mutual TLS as root: what [`Etcd::ctl`] runs for this server.
fn write_ctl_wrapper(path: &Path, etcdctl: &Path, pki: &Pki) {
    use std::os::unix::fs::PermissionsExt;
    let script = format!(
        "#!/bin/sh\nexec '{}' --cacert='{}' --cert='{}' --key='{}' --user='root:{ROOT_PASSWORD}' \"$@\"\n",
        etcdctl.display(),
        pki.ca.display(),
        pki.client_cert.display(),
        pki.client_key.display(),
    );
    std::fs::write(path, script).expect("cannot write the etcdctl wrapper");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .expect("cannot make the etcdctl wrapper executable");
}

fn start_once(
    bin: &Path,
    ctl: &Path,
    dir: &Path,
    pki: &Pki,
    attempt: usize,
) -> Result<(std::process::Child, String), String> {
    let client = format!("https://127.0.0.1:{}", etcd::free_port());
    let data = dir.join("data");
    let _ = std::fs::remove_dir_all(&data);
    let log = dir.join(format!("etcd-{attempt}.log"));
    let tls = [
        format!("--cert-file={}", pki.server_cert.display()),
        format!("--key-file={}", pki.server_key.display()),
        "--client-cert-auth".to_string(),
        format!("--trusted-ca-file={}", pki.ca.display()),
    ];
    let mut child = etcd::spawn_member(bin, "tls", &client, &data, &log, &tls)?;
    // Auth is not on yet: the client certificate alone will do.
    etcd::wait_healthy(&mut child, &log, || {
        let mut c = Command::new(ctl);
        c.arg(format!("--endpoints={client}"))
            .arg(format!("--cacert={}", pki.ca.display()))
            .arg(format!("--cert={}", pki.client_cert.display()))
            .arg(format!("--key={}", pki.client_key.display()));
        c
    })?;
    Ok((child, client))
}

/// root, the limited [`USER`] (its role starts with no permission at all), [`OUTSIDER`],
/// then `auth enable`.
fn enable_auth(etcd: &Etcd) {
    etcd.ctl(["user", "add", &format!("root:{ROOT_PASSWORD}")]);
    // etcd 3.4 and 3.5 both know the root role without `role add`; adding it again is harmless
    // on neither, so only grant it.
    etcd.ctl(["user", "grant-role", "root", "root"]);
    etcd.ctl(["role", "add", USER]);
    etcd.ctl(["user", "add", &format!("{USER}:{PASSWORD}")]);
    etcd.ctl(["user", "grant-role", USER, USER]);
    etcd.ctl(["role", "add", OUTSIDER]);
    etcd.ctl([
        "role",
        "grant-permission",
        OUTSIDER,
        "readwrite",
        "--prefix=true",
        OUTSIDER_PREFIX,
    ]);
    etcd.ctl(["user", "add", &format!("{OUTSIDER}:{OUTSIDER_PASSWORD}")]);
    etcd.ctl(["user", "grant-role", OUTSIDER, OUTSIDER]);
    etcd.ctl(["auth", "enable"]);
}

/// A CA: its certificate (PEM) and the issuer that signs with its key.
fn make_ca(cn: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().expect("CA key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.distinguished_name.push(DnType::CommonName, cn);
    let cert = p.self_signed(&key).expect("self-signed CA");
    (cert.pem(), Issuer::new(p, key))
}

/// A leaf certificate and its key (PEM), signed by `ca`.
fn make_leaf(
    ca: &Issuer<'static, KeyPair>,
    cn: &str,
    sans: &[&str],
    usages: Vec<ExtendedKeyUsagePurpose>,
) -> (String, String) {
    let key = KeyPair::generate().expect("leaf key");
    let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let mut p = CertificateParams::new(sans).expect("leaf params");
    p.distinguished_name.push(DnType::CommonName, cn);
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = usages;
    let cert = p.signed_by(&key, ca).expect("signed leaf");
    (cert.pem(), key.serialize_pem())
}

fn make_pki(dir: &Path) -> Pki {
    use ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let write = |name: &str, pem: &str| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        path
    };
    let (ca_pem, ca) = make_ca("conch test CA");
    let (rogue_ca_pem, rogue) = make_ca("unrelated CA");
    // etcd 3.4's gateway dials the server with the server's own certificate: client use too.
    let (server, server_key) = make_leaf(
        &ca,
        "etcd-server",
        &["127.0.0.1", "localhost"],
        vec![ServerAuth, ClientAuth],
    );
    let (client, client_key) = make_leaf(&ca, CLIENT_CN, &[], vec![ClientAuth]);
    let (cn, cn_key) = make_leaf(&ca, USER, &[], vec![ClientAuth]);
    let (rogue_cert, rogue_key) = make_leaf(&rogue, USER, &[], vec![ClientAuth]);
    Pki {
        dir: dir.to_path_buf(),
        ca: write("ca.pem", &ca_pem),
        server_cert: write("server.pem", &server),
        server_key: write("server-key.pem", &server_key),
        client_cert: write("client.pem", &client),
        client_key: write("client-key.pem", &client_key),
        cn_cert: write("cn-client.pem", &cn),
        cn_key: write("cn-client-key.pem", &cn_key),
        rogue_ca: write("rogue-ca.pem", &rogue_ca_pem),
        rogue_cert: write("rogue-client.pem", &rogue_cert),
        rogue_key: write("rogue-client-key.pem", &rogue_key),
    }
}
