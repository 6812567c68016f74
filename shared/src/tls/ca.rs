//! The cluster CA: creating it, issuing node certificates with a role and a short life, and
//! revoking them.
//!
//! The CA directory holds `ca.pem` and `ca.key` (0600), an index of what it issued
//! (`issued.tsv`: serial, name, role, expiry) so a node can be revoked by name, the revoked
//! serials (`revoked.tsv`) and the certificate revocation list built from them (`crl.pem`,
//! signed by the CA). Operators hand `crl.pem` to every node next to `ca.pem` (as they do
//! `ca.pem`); nodes reload it without a restart (see `reload`).

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType,
    SerialNumber,
};
use rustls::pki_types::ServerName;

use super::{
    create_dir, io_err, read_string, write_file, Role, TlsError, CA_CERT_FILE, CA_KEY_FILE, CERT_FILE,
    CRL_FILE, KEY_FILE, PEER_SERVER_NAME,
};

/// How long a node certificate is valid unless told otherwise. Short, so that a stolen one
/// stops working on its own; nodes pick up a re-issued one without a restart.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// The CA's own validity, in years.
const CA_VALIDITY_YEARS: i64 = 10;
/// A node certificate starts this long before it is issued (clock skew between nodes).
const BACKDATE: Duration = Duration::from_secs(3600);
/// Maximum length of a node name (the maximum length of a DNS name).
const MAX_NAME_LEN: usize = 253;
/// Index of issued certificates in the CA directory.
const ISSUED_FILE: &str = "issued.tsv";
/// Revoked serials in the CA directory.
const REVOKED_FILE: &str = "revoked.tsv";

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

fn at(unix: i64) -> Result<time::OffsetDateTime, TlsError> {
    time::OffsetDateTime::from_unix_timestamp(unix).map_err(|_| TlsError::TimeRange(unix))
}

fn validate_name(name: &str) -> Result<(), TlsError> {
    let reason = if name.is_empty() {
        "name is empty"
    } else if name.len() > MAX_NAME_LEN {
        "name is longer than 253 characters"
    } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-') {
        "name may only contain ASCII letters, digits, '.' and '-'"
    } else {
        return Ok(());
    };
    Err(TlsError::InvalidName { name: name.to_string(), reason })
}

/// Creates a new cluster CA in `dir`: writes `dir/ca.pem` (certificate) and `dir/ca.key`
/// (private key, mode 0600). Creates `dir` if needed. Refuses to overwrite an existing `ca.key`.
pub fn init_ca(dir: &Path) -> Result<(), TlsError> {
    create_dir(dir)?;
    let key_path = dir.join(CA_KEY_FILE);
    if key_path.exists() {
        return Err(TlsError::AlreadyExists { path: key_path });
    }

    let key = KeyPair::generate().map_err(TlsError::Generate)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Shoal");
    dn.push(DnType::CommonName, "Shoal cluster CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = now_secs();
    params.not_before = at(now - BACKDATE.as_secs() as i64)?;
    params.not_after = at(now + CA_VALIDITY_YEARS * 365 * 24 * 3600)?;
    let cert = params.self_signed(&key).map_err(TlsError::Generate)?;

    // Key first, with create_new, so a concurrent init cannot clobber an existing CA.
    write_file(&key_path, &key.serialize_pem(), true, true).map_err(|e| match e {
        TlsError::Io { path, source } if source.kind() == io::ErrorKind::AlreadyExists => {
            TlsError::AlreadyExists { path }
        }
        e => e,
    })?;
    write_file(&dir.join(CA_CERT_FILE), &cert.pem(), false, false)?;
    tracing::info!(dir = %dir.display(), "created cluster CA");
    Ok(())
}

/// Loads the CA in `ca_dir` for signing; returns it with its certificate's PEM.
fn load_issuer(ca_dir: &Path) -> Result<(Issuer<'static, KeyPair>, String), TlsError> {
    let ca_cert_path = ca_dir.join(CA_CERT_FILE);
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let ca_cert_pem = read_string(&ca_cert_path)?;
    let ca_key_pem = read_string(&ca_key_path)?;
    let ca_key =
        KeyPair::from_pem(&ca_key_pem).map_err(|source| TlsError::CaLoad { path: ca_key_path, source })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_cert_pem, ca_key)
        .map_err(|source| TlsError::CaLoad { path: ca_cert_path, source })?;
    Ok((issuer, ca_cert_pem))
}

/// [`issue_with`] for [`DEFAULT_VALIDITY`].
pub fn issue(ca_dir: &Path, name: &str, role: Role, out: &Path) -> Result<(), TlsError> {
    issue_with(ca_dir, name, role, DEFAULT_VALIDITY, out)
}

/// Issues a node certificate signed by the CA in `ca_dir`, valid for `validity`, writing
/// `out/ca.pem` (copy of the CA certificate), `out/cert.pem`, `out/key.pem` (mode 0600) and,
/// when the CA has revoked anything, `out/crl.pem`. Creates `out` if needed and overwrites
/// previous node files (a node running on `out` picks them up).
///
/// Subject alternative names: `name` (as an IP SAN if it is an IP address, as a DNS SAN if it is
/// a valid DNS name, omitted otherwise), [`PEER_SERVER_NAME`], `localhost`, `127.0.0.1`, and the
/// role as `urn:shoal:role:<role>`. Valid for TLS server and client authentication.
///
/// `name` must be non-empty, at most 253 characters, and consist of `[A-Za-z0-9.-]`.
pub fn issue_with(
    ca_dir: &Path,
    name: &str,
    role: Role,
    validity: Duration,
    out: &Path,
) -> Result<(), TlsError> {
    validate_name(name)?;
    let (issuer, ca_cert_pem) = load_issuer(ca_dir)?;

    let mut sans: Vec<SanType> = Vec::new();
    let mut push = |san: SanType| {
        if !sans.contains(&san) {
            sans.push(san);
        }
    };
    let dns = |s: &str| -> Result<SanType, TlsError> {
        Ok(SanType::DnsName(s.try_into().map_err(TlsError::Generate)?))
    };
    match ServerName::try_from(name) {
        Ok(ServerName::IpAddress(ip)) => push(SanType::IpAddress(IpAddr::from(ip))),
        Ok(ServerName::DnsName(_)) => push(dns(name)?),
        Ok(_) | Err(_) => {
            tracing::debug!(name, "node name is not a valid DNS name; no SAN added for it")
        }
    }
    push(dns(PEER_SERVER_NAME)?);
    push(dns("localhost")?);
    push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    push(SanType::URI(role.uri().try_into().map_err(TlsError::Generate)?));

    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Shoal");
    dn.push(DnType::OrganizationalUnitName, role.as_str());
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let serial: [u8; 16] = rand::random();
    // A positive serial (its top bit clear), as RFC 5280 asks.
    let mut serial = serial.to_vec();
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let now = now_secs();
    let not_after = now + validity.as_secs() as i64;
    params.not_before = at(now - BACKDATE.as_secs() as i64)?;
    params.not_after = at(not_after)?;

    let key = KeyPair::generate().map_err(TlsError::Generate)?;
    let cert = params.signed_by(&key, &issuer).map_err(TlsError::Generate)?;

    let index = ca_dir.join(ISSUED_FILE);
    let line = format!("{}\t{name}\t{role}\t{not_after}\n", hex::encode(&serial));
    append(&index, &line)?;
    create_dir(out)?;
    write_file(&out.join(CA_CERT_FILE), &ca_cert_pem, false, false)?;
    let crl = ca_dir.join(CRL_FILE);
    if crl.exists() {
        write_file(&out.join(CRL_FILE), &read_string(&crl)?, false, false)?;
    }
    write_file(&out.join(KEY_FILE), &key.serialize_pem(), true, false)?;
    write_file(&out.join(CERT_FILE), &cert.pem(), false, false)?;
    tracing::info!(name, %role, out = %out.display(), days = validity.as_secs() / 86400, "issued node certificate");
    Ok(())
}

fn append(path: &Path, line: &str) -> Result<(), TlsError> {
    use std::io::Write as _;
    let mut f = fs::OpenOptions::new().create(true).append(true).open(path).map_err(io_err(path))?;
    f.write_all(line.as_bytes()).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Lines of a tab-separated file, split; none if it does not exist.
fn rows(path: &Path) -> Result<Vec<Vec<String>>, TlsError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.split('\t').map(str::to_owned).collect())
            .collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// What to revoke.
#[derive(Debug, Clone, Copy)]
pub enum RevokeTarget<'a> {
    /// Every certificate the CA issued under this node name.
    Name(&'a str),
    /// One certificate, by its serial number in hex.
    Serial(&'a str),
}

/// Revokes certificates issued by the CA in `ca_dir` and rewrites its `crl.pem`. Returns how
/// many serials were newly revoked (0 when they already were). An unknown name or serial is
/// an error, so a typo does not pass for a revocation.
pub fn revoke(ca_dir: &Path, target: RevokeTarget<'_>) -> Result<usize, TlsError> {
    let issued = rows(&ca_dir.join(ISSUED_FILE))?;
    let serials: Vec<String> = match target {
        RevokeTarget::Name(name) => issued
            .iter()
            .filter(|r| r.get(1).map(String::as_str) == Some(name))
            .map(|r| r[0].clone())
            .collect(),
        RevokeTarget::Serial(serial) => {
            let serial = normalize_serial(serial);
            issued.iter().filter(|r| normalize_serial(&r[0]) == serial).map(|r| r[0].clone()).collect()
        }
    };
    if serials.is_empty() {
        let what = match target {
            RevokeTarget::Name(n) => format!("name {n:?}"),
            RevokeTarget::Serial(s) => format!("serial {s:?}"),
        };
        return Err(TlsError::NotIssued(what));
    }
    let revoked_path = ca_dir.join(REVOKED_FILE);
    let already: Vec<String> = rows(&revoked_path)?.into_iter().map(|r| r[0].clone()).collect();
    let now = now_secs();
    let mut added = 0;
    for serial in serials.iter().filter(|s| !already.contains(s)) {
        append(&revoked_path, &format!("{serial}\t{now}\n"))?;
        added += 1;
    }
    write_crl(ca_dir)?;
    Ok(added)
}

/// A serial as hex digits only: lower case, without `0x`, colons or leading zeros (openssl
/// prints `01:AB`, the index keeps `00ab...`).
fn normalize_serial(serial: &str) -> String {
    let hex: String = serial.trim().trim_start_matches("0x").chars().filter(|c| *c != ':').collect();
    hex.to_ascii_lowercase().trim_start_matches('0').to_owned()
}

/// Signs a CRL listing every revoked serial into `ca_dir/crl.pem`.
fn write_crl(ca_dir: &Path) -> Result<(), TlsError> {
    let (issuer, _) = load_issuer(ca_dir)?;
    let now = now_secs();
    let revoked_certs = rows(&ca_dir.join(REVOKED_FILE))?
        .into_iter()
        .filter_map(|r| {
            let serial = hex::decode(&r[0]).ok()?;
            let when = r.get(1).and_then(|t| t.parse::<i64>().ok()).unwrap_or(now);
            Some((serial, when))
        })
        .map(|(serial, when)| {
            Ok(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial),
                revocation_time: at(when)?,
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
        })
        .collect::<Result<Vec<_>, TlsError>>()?;
    let params = CertificateRevocationListParams {
        this_update: at(now - BACKDATE.as_secs() as i64)?,
        next_update: at(now + 365 * 24 * 3600)?,
        crl_number: SerialNumber::from(now.max(1) as u64),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&issuer).map_err(TlsError::Generate)?;
    let pem = crl.pem().map_err(TlsError::Generate)?;
    write_file(&ca_dir.join(CRL_FILE), &pem, false, false)?;
    tracing::info!(dir = %ca_dir.display(), "wrote certificate revocation list");
    Ok(())
}
