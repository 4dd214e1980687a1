//! Name resolution for the HTTP executor without a thread per request: IP literals are used as
//! they are, and host names are cached for a short while. (ureq's own resolver starts a thread
//! for every lookup when a timeout is set, before it even looks for a pooled connection.)

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use ureq::config::Config;
use ureq::http::Uri;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;

/// How long a looked-up host name is reused.
const TTL: Duration = Duration::from_secs(30);
/// Most host names kept; the cache is emptied when it is full.
const MAX_NAMES: usize = 1024;

/// Looked-up host names with when, shared by every agent and the plain client
/// ([`super::plain`]), which makes its resolver where it needs one.
type Names = HashMap<String, (Instant, ResolvedSocketAddrs)>;
static NAMES: Mutex<Option<Names>> = Mutex::new(None);

/// Resolves IP literals directly and caches host names for [`TTL`] (in one cache for the
/// process: the resolver itself holds nothing).
#[derive(Debug, Default)]
pub(crate) struct CachingResolver {
    inner: DefaultResolver,
}

/// The port of `uri`, explicit or the scheme's default.
fn port_of(uri: &Uri) -> Option<u16> {
    let auth = uri.authority()?;
    auth.port_u16().or(match uri.scheme_str()? {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    })
}

impl Resolver for CachingResolver {
    fn resolve(
        &self,
        uri: &Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let (Some(auth), Some(port)) = (uri.authority(), port_of(uri)) else {
            return self.inner.resolve(uri, config, timeout);
        };
        let host = auth.host();
        if let Ok(ip) = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            let mut out = self.inner.empty();
            out.push(SocketAddr::new(ip, port));
            return Ok(out);
        }
        let key = format!("{host}:{port}");
        if let Some((at, addrs)) = NAMES.lock().as_ref().and_then(|n| n.get(&key)) {
            if at.elapsed() < TTL {
                return Ok(addrs.clone());
            }
        }
        let addrs = self.inner.resolve(uri, config, timeout)?;
        let mut names = NAMES.lock();
        let names = names.get_or_insert_with(HashMap::new);
        if names.len() >= MAX_NAMES {
            names.clear();
        }
        names.insert(key, (Instant::now(), addrs.clone()));
        Ok(addrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_from_the_uri_or_the_scheme() {
        let p = |s: &str| port_of(&s.parse::<Uri>().expect("uri"));
        assert_eq!(p("http://10.0.0.1:8080/x"), Some(8080));
        assert_eq!(p("http://svc/x"), Some(80));
        assert_eq!(p("https://svc/x"), Some(443));
        assert_eq!(p("https://[::1]:9/x"), Some(9));
    }

    #[test]
    fn literals_and_names_resolve() {
        let r = CachingResolver::default();
        let config = Config::default();
        let t = NextTimeout {
            after: ureq::unversioned::transport::time::Duration::NotHappening,
            reason: ureq::Timeout::Resolve,
            per_read: None,
            per_write: None,
        };
        let got = |u: &str| {
            r.resolve(&u.parse().expect("uri"), &config, t)
                .expect("resolves")
                .to_vec()
        };
        assert_eq!(
            got("http://127.0.0.1:81/"),
            ["127.0.0.1:81".parse().expect("addr")]
        );
        assert_eq!(got("http://[::1]:82/"), ["[::1]:82".parse().expect("addr")]);
        let first = got("http://localhost:83/");
        assert!(
            first.iter().all(|a| a.port() == 83 && a.ip().is_loopback()),
            "{first:?}"
        );
        let cached = NAMES
            .lock()
            .as_ref()
            .map(|n| n.contains_key("localhost:83"));
        assert_eq!(cached, Some(true), "the name is cached");
        assert_eq!(got("http://localhost:83/"), first);
    }
}
