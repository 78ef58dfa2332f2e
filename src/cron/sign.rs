//! Signed job specs (quality.md §5): whoever can write `<prefix>/v1/cron/job/` can run
//! commands on every conchd node, so `conchd --trust-key` runs only specs signed with a
//! trusted Ed25519 key. Keys and signatures use `ring` (already linked for TLS).
//!
//! - Key files are one line of text: `conch-ed25519-private <seed, 64 hex>` (mode 0600) and
//!   `conch-ed25519 <public key, 64 hex>` (`<file>.pub`), written by `conch keygen <file>`.
//! - A spec's `signature` field is `ed25519:<public key hex>:<signature hex>`.
//! - What is signed: a domain tag, the job's name, and every field that decides what runs,
//!   where and when (schedule, zone, command, run TTL, overlap, starting deadline, node
//!   selector, jitter, who added it and when). Not signed: `paused` and `resumed_at`, so an
//!   operator without the key can still pause and resume a job (that never runs anything new).
//!   A spec edited in etcd after signing, or copied under another name, fails verification.
//! - Not prevented: putting back an older spec that was validly signed for the same name.

#![forbid(unsafe_code)]

use std::fmt;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use super::job::JobSpec;

const PRIVATE_TAG: &str = "conch-ed25519-private";
const PUBLIC_TAG: &str = "conch-ed25519";
const SIG_TAG: &str = "ed25519";
/// Separates conch's job signatures from anything else the same key might sign.
const DOMAIN: &[u8] = b"conch job spec v1\0";

/// A private key read from a `conch keygen` file.
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", hex(self.public().as_slice()))
    }
}

/// The public keys conchd trusts (`--trust-key`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedKeys(Vec<[u8; 32]>);

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write key file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a conch {what} key (expected one line \"{tag} <64 hex digits>\")")]
    Format {
        path: PathBuf,
        what: &'static str,
        tag: &'static str,
    },
    #[error("{path} holds an invalid Ed25519 key")]
    Invalid { path: PathBuf },
    #[error("no random bytes for a new key")]
    Random,
}

/// Why a spec is not run under `--trust-key` (recorded as the `refused` result's reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the job spec is not signed")]
    Unsigned,
    #[error("the job spec's signature is malformed")]
    Malformed,
    #[error("the job spec is signed by key {0}, which this node does not trust")]
    Untrusted(String),
    #[error("the job spec's signature does not match its content (edited after signing?)")]
    BadSignature,
}

/// `conch keygen FILE`: a new key pair in `FILE` (private, mode 0600) and `FILE.pub`. Refuses
/// to overwrite either. Returns the path of the public key file.
pub fn keygen(path: &Path) -> Result<PathBuf, KeyError> {
    let seed: [u8; 32] = ring::rand::generate(&SystemRandom::new())
        .map_err(|_| KeyError::Random)?
        .expose();
    let pair = Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|_| KeyError::Random)?;
    let public = pub_path(path);
    let write = |p: &Path, mode: u32, text: String| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(p)
            .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|_| f.sync_all()))
            .map_err(|source| KeyError::Write {
                path: p.to_path_buf(),
                source,
            })
    };
    // Neither file may exist: check the second before writing the first.
    if public.exists() {
        return Err(KeyError::Write {
            path: public,
            source: std::io::ErrorKind::AlreadyExists.into(),
        });
    }
    write(path, 0o600, format!("{PRIVATE_TAG} {}\n", hex(&seed)))?;
    if let Err(e) = write(
        &public,
        0o644,
        format!("{PUBLIC_TAG} {}\n", hex(pair.public_key().as_ref())),
    ) {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(public)
}

/// `<file>.pub`.
pub fn pub_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

impl SigningKey {
    pub fn read(path: &Path) -> Result<SigningKey, KeyError> {
        let seed: [u8; 32] = read_key(path, "private", PRIVATE_TAG)?;
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|_| KeyError::Invalid {
            path: path.to_path_buf(),
        })?;
        Ok(SigningKey { pair })
    }

    pub fn public(&self) -> [u8; 32] {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.pair.public_key().as_ref());
        k
    }

    /// The `signature` field for `spec` stored as job `name`.
    pub fn sign(&self, name: &str, spec: &JobSpec) -> String {
        let sig = self.pair.sign(&message(name, spec));
        format!(
            "{SIG_TAG}:{}:{}",
            hex(self.public().as_slice()),
            hex(sig.as_ref())
        )
    }
}

impl TrustedKeys {
    /// Read public key files (`--trust-key FILE[,FILE]`). A private key file is accepted too
    /// (its public half is used), so one file can serve a test setup.
    pub fn read(paths: &[PathBuf]) -> Result<TrustedKeys, KeyError> {
        let mut keys = Vec::new();
        for p in paths {
            let key = match read_key(p, "public", PUBLIC_TAG) {
                Ok(k) => k,
                Err(KeyError::Format { .. }) => SigningKey::read(p)?.public(),
                Err(e) => return Err(e),
            };
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        Ok(TrustedKeys(keys))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether conchd may run `spec` (stored as job `name`): with no trusted keys every spec
    /// runs; with some, only one [`TrustedKeys::verify`] accepts.
    pub fn admit(&self, name: &str, spec: &JobSpec) -> Result<(), Refusal> {
        if self.is_empty() {
            return Ok(());
        }
        self.verify(name, spec)
    }

    /// Check `spec` (stored as job `name`) against the trusted keys.
    pub fn verify(&self, name: &str, spec: &JobSpec) -> Result<(), Refusal> {
        let field = spec.signature.as_deref().ok_or(Refusal::Unsigned)?;
        let mut parts = field.split(':');
        let (Some(SIG_TAG), Some(key), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Refusal::Malformed);
        };
        let key: [u8; 32] = unhex(key).ok_or(Refusal::Malformed)?;
        let sig: [u8; 64] = unhex(sig).ok_or(Refusal::Malformed)?;
        if !self.0.contains(&key) {
            return Err(Refusal::Untrusted(short(&key)));
        }
        UnparsedPublicKey::new(&ED25519, key)
            .verify(&message(name, spec), &sig)
            .map_err(|_| Refusal::BadSignature)
    }
}

/// The bytes a job's signature covers: see the module docs.
pub fn message(name: &str, spec: &JobSpec) -> Vec<u8> {
    let signed = serde_json::json!([
        spec.schedule,
        spec.tz,
        spec.cmd,
        spec.run_ttl,
        spec.overlap,
        spec.starting_deadline,
        spec.node_selector,
        spec.jitter,
        spec.added_by,
        spec.added_at,
    ]);
    let mut m = Vec::with_capacity(256);
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(name.as_bytes());
    m.push(0);
    m.extend_from_slice(signed.to_string().as_bytes());
    m
}

/// The first 8 bytes of a key in hex: enough to tell keys apart in a message.
fn short(key: &[u8; 32]) -> String {
    hex(&key[..8])
}

fn read_key<const N: usize>(
    path: &Path,
    what: &'static str,
    tag: &'static str,
) -> Result<[u8; N], KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let format = || KeyError::Format {
        path: path.to_path_buf(),
        what,
        tag,
    };
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let line = lines.next().ok_or_else(format)?;
    if lines.next().is_some() {
        return Err(format());
    }
    let mut words = line.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(t), Some(h), None) if t == tag => unhex(h).ok_or_else(format),
        _ => Err(format()),
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cron::job::Overlap;

    /// A scratch directory, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Scratch {
            static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("conch-sign-test-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn spec() -> JobSpec {
        JobSpec {
            schedule: "*/5 * * * *".into(),
            tz: "UTC".into(),
            cmd: vec!["/usr/local/bin/backup".into(), "--all".into()],
            run_ttl: "10m".into(),
            overlap: Overlap::Forbid,
            starting_deadline: "1m".into(),
            node_selector: [("role".to_string(), "db".to_string())].into(),
            jitter: "0s".into(),
            paused: false,
            added_by: "ops@admin1".into(),
            added_at: "2026-11-28T10:00:00Z".into(),
            resumed_at: None,
            signature: None,
        }
    }

    fn keys(dir: &Path, name: &str) -> (SigningKey, TrustedKeys) {
        let path = dir.join(name);
        let public = keygen(&path).unwrap();
        let key = SigningKey::read(&path).unwrap();
        let trusted = TrustedKeys::read(&[public]).unwrap();
        (key, trusted)
    }

    #[test]
    fn a_signed_spec_verifies_and_pausing_keeps_it_valid() {
        let dir = Scratch::new();
        let (key, trusted) = keys(dir.path(), "k");
        let mut s = spec();
        s.signature = Some(key.sign("backup", &s));
        assert_eq!(trusted.verify("backup", &s), Ok(()));
        s.paused = true;
        s.resumed_at = Some("2026-11-28T11:00:00Z".into());
        assert_eq!(
            trusted.verify("backup", &s),
            Ok(()),
            "pause/resume are not signed"
        );
    }

    #[test]
    fn every_signed_field_edited_after_signing_is_refused() {
        let dir = Scratch::new();
        let (key, trusted) = keys(dir.path(), "k");
        let mut signed = spec();
        signed.signature = Some(key.sign("backup", &signed));
        type Edit = Box<dyn Fn(&mut JobSpec)>;
        let edits: Vec<(&str, Edit)> = vec![
            ("schedule", Box::new(|s| s.schedule = "* * * * *".into())),
            ("tz", Box::new(|s| s.tz = "Europe/Berlin".into())),
            ("cmd", Box::new(|s| s.cmd[0] = "/bin/evil".into())),
            ("cmd arg", Box::new(|s| s.cmd.push("x".into()))),
            ("run_ttl", Box::new(|s| s.run_ttl = "10h".into())),
            ("overlap", Box::new(|s| s.overlap = Overlap::Allow)),
            ("deadline", Box::new(|s| s.starting_deadline = "2m".into())),
            ("selector", Box::new(|s| s.node_selector.clear())),
            ("jitter", Box::new(|s| s.jitter = "5s".into())),
            ("added_by", Box::new(|s| s.added_by = "x@y".into())),
            (
                "added_at",
                Box::new(|s| s.added_at = "2020-01-01T00:00:00Z".into()),
            ),
        ];
        for (what, edit) in edits {
            let mut s = signed.clone();
            edit(&mut s);
            assert_eq!(
                trusted.verify("backup", &s),
                Err(Refusal::BadSignature),
                "{what}"
            );
        }
        assert_eq!(
            trusted.verify("other-name", &signed),
            Err(Refusal::BadSignature),
            "a signed spec copied under another name"
        );
    }

    #[test]
    fn unsigned_malformed_and_untrusted_are_refused_with_their_reason() {
        let dir = Scratch::new();
        let (key, trusted) = keys(dir.path(), "k");
        let (other, _) = keys(dir.path(), "other");
        let s = spec();
        assert_eq!(trusted.verify("j", &s), Err(Refusal::Unsigned));
        for bad in [
            "",
            "ed25519",
            "ed25519:zz:zz",
            "rsa:00:00",
            "ed25519:00:00:00",
        ] {
            let mut m = s.clone();
            m.signature = Some(bad.into());
            assert_eq!(trusted.verify("j", &m), Err(Refusal::Malformed), "{bad:?}");
        }
        let mut m = s.clone();
        m.signature = Some(other.sign("j", &m));
        assert_eq!(
            trusted.verify("j", &m),
            Err(Refusal::Untrusted(short(&other.public())))
        );
        // A valid signature with a trusted key's id but another key's bytes.
        let mut forged = s.clone();
        let theirs = other.sign("j", &forged);
        let sig = theirs.rsplit(':').next().unwrap();
        forged.signature = Some(format!("ed25519:{}:{sig}", hex(&key.public())));
        assert_eq!(trusted.verify("j", &forged), Err(Refusal::BadSignature));
    }

    #[test]
    fn keygen_writes_a_private_file_only_its_owner_reads_and_never_overwrites() {
        use std::os::unix::fs::PermissionsExt;
        let dir = Scratch::new();
        let path = dir.path().join("k");
        let public = keygen(&path).unwrap();
        assert_eq!(public, dir.path().join("k.pub"));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let before = std::fs::read(&path).unwrap();
        assert!(matches!(keygen(&path), Err(KeyError::Write { .. })));
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "the old key is untouched"
        );
        // Only the .pub left from an earlier run: still refused, and no private key written.
        let lone = dir.path().join("lone");
        std::fs::write(pub_path(&lone), "x").unwrap();
        assert!(matches!(keygen(&lone), Err(KeyError::Write { .. })));
        assert!(!lone.exists());
        // Two keys differ; a private key file also serves as a trusted key.
        let second = keygen(&dir.path().join("k2")).unwrap();
        assert_ne!(
            std::fs::read(&public).unwrap(),
            std::fs::read(&second).unwrap()
        );
        let t = TrustedKeys::read(std::slice::from_ref(&path)).unwrap();
        assert_eq!(t, TrustedKeys::read(&[public]).unwrap());
    }

    #[test]
    fn key_files_that_are_not_conch_keys_are_refused_by_name() {
        let dir = Scratch::new();
        for (i, text) in [
            "",
            "conch-ed25519 abcd\n",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI\n",
            &format!("conch-ed25519 {}\nsecond line\n", "00".repeat(32)),
            &format!("conch-ed25519-private {}", "zz".repeat(32)),
        ]
        .iter()
        .enumerate()
        {
            let p = dir.path().join(format!("bad{i}"));
            std::fs::write(&p, text).unwrap();
            let e = TrustedKeys::read(std::slice::from_ref(&p)).unwrap_err();
            assert!(e.to_string().contains(&p.display().to_string()), "{e}");
            assert!(SigningKey::read(&p).is_err());
        }
        let missing = dir.path().join("missing");
        assert!(matches!(
            TrustedKeys::read(&[missing]),
            Err(KeyError::Read { .. })
        ));
    }
}
