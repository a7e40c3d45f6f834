//! HTTPS for the center's API: a server certificate from the center's own CA, and the
//! CA certificate published as `DATA_DIR/ca.pem` for clients to pin.
//!
//! Why it is shaped like this:
//!
//! * **The API is HTTPS by default**, so tokens never cross the network in cleartext.
//!   Plain HTTP needs `insecure_http` (the `--insecure-http` flag), and is logged
//!   loudly.
//! * **The certificate is issued by the CA the agents already pin**, at every start
//!   (like the QUIC identity): nothing to renew by hand, and the agents verify the
//!   API with the CA they got at enrollment. Its names are the listen address,
//!   loopback (`127.0.0.1`, `::1`, `localhost`), the host name, and any `--api-san`;
//!   a center listening on every interface names every address it has, so clients
//!   that dial any of them pass the usual name check (curl, rustls).
//! * **`ca.pem` is public**: it holds only the CA's certificate (0644), never its key.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use octopus_transfer::tls::{self, CertAuthority};

/// The names the API's certificate carries for a center listening on `listen`.
pub fn api_names(listen: SocketAddr, extra: &[String]) -> Vec<String> {
    let mut ips: Vec<IpAddr> = Vec::new();
    if listen.ip().is_unspecified() {
        ips.extend(local_addresses());
    } else {
        ips.push(listen.ip());
    }
    ips.push(IpAddr::from([127, 0, 0, 1]));
    ips.push(IpAddr::from(std::net::Ipv6Addr::LOCALHOST));
    let mut names: Vec<String> = ips.iter().map(IpAddr::to_string).collect();
    names.push("localhost".into());
    let host = octopus_agent::hostinfo::hostname();
    if !host.is_empty() {
        names.push(host);
    }
    names.extend(extra.iter().map(|s| s.trim().to_string()));
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| !n.is_empty() && seen.insert(n.clone()));
    names
}

/// Every address of this host's interfaces (getifaddrs).
fn local_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we walk read-only and free once.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut p = head;
        while !p.is_null() {
            let a = (*p).ifa_addr;
            if !a.is_null() {
                match i32::from((*a).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(a as *const libc::sockaddr_in);
                        out.push(IpAddr::from(
                            u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                        ));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(a as *const libc::sockaddr_in6);
                        out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out
}

/// The rustls configuration of the API: a fresh key and a certificate for `names`
/// from `ca`.
pub fn server_config(
    ca: &CertAuthority,
    names: &[String],
) -> Result<Arc<rustls::ServerConfig>, tls::TlsError> {
    let id = ca.issue_server_identity(names)?;
    Ok(Arc::new(tls::https_server_config(&id)?))
}

/// A DER certificate as PEM.
pub fn pem(der: &[u8]) -> String {
    let b64 = data_encoding::BASE64.encode(der);
    let mut s = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(line).unwrap_or_default());
        s.push('\n');
    }
    s.push_str("-----END CERTIFICATE-----\n");
    s
}

/// Writes the CA certificate to `DATA_DIR/ca.pem` (0600 like every file of the private data
/// directory, though it is public: copy it out to give it to clients), through a
/// temporary file opened without following links and renamed into place.
pub fn write_ca_pem(data_dir: &Path, ca_der: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let path = data_dir.join("ca.pem");
    let tmp = data_dir.join(".ca.pem.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&tmp)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(pem(ca_der).as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cover_the_listen_address_loopback_and_extras() {
        let n = api_names("10.1.2.3:7070".parse().unwrap(), &["api.example".into()]);
        for want in ["10.1.2.3", "127.0.0.1", "::1", "localhost", "api.example"] {
            assert!(n.iter().any(|x| x == want), "{want} missing from {n:?}");
        }
        let any = api_names("0.0.0.0:7070".parse().unwrap(), &[]);
        assert!(!any.iter().any(|x| x == "0.0.0.0"), "{any:?}");
        assert!(any.iter().any(|x| x == "127.0.0.1"), "{any:?}");
    }

    #[test]
    fn the_api_certificate_chains_to_the_ca() {
        let ca = CertAuthority::generate().unwrap();
        let id = ca
            .issue_server_identity(&["127.0.0.1".into(), "localhost".into()])
            .unwrap();
        tls::verify_issued(&id.cert, &ca.cert, false).unwrap();
        assert_eq!(id.chain, vec![ca.cert.clone()]);
        assert!(pem(&ca.cert).starts_with("-----BEGIN CERTIFICATE-----\n"));
    }
}
