//! Scraping the agent's `/metrics` and parsing the Prometheus text
//! exposition format (0.0.4), strictly: every sample must belong to a
//! family declared with `# TYPE`, names and labels must be well formed,
//! histograms must be consistent. Written from the format's specification,
//! independently of the agent's encoder.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::netns::Netns;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot scrape http://{addr}/metrics")]
    Scrape {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot scrape /metrics on the socket {path}")]
    ScrapeUnix {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bad HTTP answer from /metrics: {0}")]
    Http(String),
    #[error("line {line}: {message}: {text:?}")]
    Parse {
        line: usize,
        message: &'static str,
        text: String,
    },
    #[error("histogram {0} is inconsistent: {1}")]
    Histogram(String, String),
}

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition: family types and samples.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    /// Family name -> type (`counter`, `gauge`, `histogram`, ...).
    pub types: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// The value of the sample `name` whose labels include `labels`; there
    /// must be exactly one.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = self.samples.iter().filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        });
        let first = found.next()?;
        found.next().is_none().then_some(first.value)
    }

    /// Like [`Exposition::value`], but an absent labelled series counts as 0
    /// (Prometheus clients emit a label set only once it was used).
    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(0.0)
    }

    /// The values label `label` takes across the samples of `name`, once
    /// each, in order.
    pub fn label_values(&self, name: &str, label: &str) -> Vec<String> {
        let values: BTreeSet<&String> = self
            .samples
            .iter()
            .filter(|s| s.name == name)
            .filter_map(|s| s.labels.get(label))
            .collect();
        values.into_iter().cloned().collect()
    }
}

/// `GET /metrics` on `addr` from inside `ns`; returns the body.
pub fn scrape(ns: &Netns, addr: SocketAddr) -> Result<String, MetricsError> {
    let fetch = move || -> std::io::Result<Vec<u8>> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer)?;
        Ok(answer)
    };
    let answer = ns
        .run(fetch)
        .map_err(|source| MetricsError::Scrape { addr, source })?;
    metrics_body(answer)
}

/// `GET /metrics` on the agent's operator socket at `path`.
pub fn scrape_unix(path: &std::path::Path) -> Result<String, MetricsError> {
    let answer = get_unix(path, "/metrics").map_err(|source| MetricsError::ScrapeUnix {
        path: path.to_owned(),
        source,
    })?;
    metrics_body(answer.into_bytes())
}

/// A minimal HTTP/1.1 `GET url_path` on a Unix socket; the whole answer
/// (head and body).
pub fn get_unix(path: &std::path::Path, url_path: &str) -> std::io::Result<String> {
    let mut stream = std::os::unix::net::UnixStream::connect(path)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {url_path} HTTP/1.1\r\nHost: tcpgate\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

/// The body of a well-formed `/metrics` answer.
fn metrics_body(answer: Vec<u8>) -> Result<String, MetricsError> {
    let answer = String::from_utf8(answer).map_err(|e| MetricsError::Http(e.to_string()))?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| MetricsError::Http("no header end".to_owned()))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(MetricsError::Http(head.to_owned()));
    }
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .unwrap_or_default();
    if !content_type.starts_with("text/plain; version=0.0.4") {
        return Err(MetricsError::Http(format!("content-type {content_type:?}")));
    }
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Err(MetricsError::Http("chunked answer not expected".to_owned()));
    }
    Ok(body.to_owned())
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label(name: &str) -> bool {
    valid_name(name) && !name.contains(':')
}

fn parse_value(text: &str) -> Option<f64> {
    match text {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => text.parse().ok(),
    }
}

/// Parses `{a="x",b="y\"z"}` at the start of `text`; returns the labels and
/// the rest.
fn parse_labels(text: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    let mut rest = text.strip_prefix('{')?;
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = rest.find('=')?;
        let name = rest[..eq].trim();
        if !valid_label(name) {
            return None;
        }
        rest = rest[eq + 1..].strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    _ => return None,
                },
                (_, c) => value.push(c),
            }
        };
        if labels.insert(name.to_owned(), value).is_some() {
            return None;
        }
        rest = rest[end + 1..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// The family a sample belongs to, given the declared types.
fn family_of<'a>(name: &'a str, types: &BTreeMap<String, String>) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && types
                .get(base)
                .is_some_and(|t| t == "histogram" || t == "summary")
        {
            return Some(base);
        }
    }
    None
}

/// Parses a whole exposition.
pub fn parse(text: &str) -> Result<Exposition, MetricsError> {
    let err = |line: usize, message: &'static str, text: &str| MetricsError::Parse {
        line,
        message,
        text: text.to_owned(),
    };
    if !text.is_empty() && !text.ends_with('\n') {
        return Err(err(0, "the exposition must end with a newline", ""));
    }
    let mut out = Exposition::default();
    for (index, line) in text.lines().enumerate() {
        let n = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("TYPE"), Some(name), Some(kind)) => {
                    if !valid_name(name)
                        || !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind)
                    {
                        return Err(err(n, "bad TYPE line", line));
                    }
                    if out.types.insert(name.to_owned(), kind.to_owned()).is_some() {
                        return Err(err(n, "family declared twice", line));
                    }
                }
                (Some("HELP"), Some(name), _) if valid_name(name) => {}
                (Some("HELP"), _, _) => return Err(err(n, "bad HELP line", line)),
                _ => {}
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        if !valid_name(name) {
            return Err(err(n, "bad metric name", line));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).ok_or_else(|| err(n, "bad labels", line))?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut fields = rest.split_whitespace();
        let value = fields
            .next()
            .and_then(parse_value)
            .ok_or_else(|| err(n, "bad value", line))?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .map_err(|_| err(n, "bad timestamp", line))?;
        }
        if fields.next().is_some() {
            return Err(err(n, "trailing fields", line));
        }
        if family_of(name, &out.types).is_none() {
            return Err(err(n, "sample without a TYPE line", line));
        }
        out.samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    check_histograms(&out)?;
    Ok(out)
}

/// A series' labels other than `le`, sorted.
type LabelPairs = Vec<(String, String)>;

/// Buckets are cumulative, end with `+Inf`, and `+Inf` equals `_count`.
fn check_histograms(exposition: &Exposition) -> Result<(), MetricsError> {
    for (family, kind) in &exposition.types {
        if kind != "histogram" {
            continue;
        }
        let bucket_name = format!("{family}_bucket");
        let mut series: BTreeMap<LabelPairs, Vec<(f64, f64)>> = BTreeMap::new();
        for s in exposition.samples.iter().filter(|s| s.name == bucket_name) {
            let le = s
                .labels
                .get("le")
                .and_then(|v| parse_value(v))
                .ok_or_else(|| {
                    MetricsError::Histogram(family.clone(), "bucket without le".into())
                })?;
            let key = s
                .labels
                .iter()
                .filter(|(k, _)| *k != "le")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            series.entry(key).or_default().push((le, s.value));
        }
        for (labels, buckets) in series {
            let cumulative = buckets
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1);
            let last = buckets.last().copied().unwrap_or((0.0, 0.0));
            let wanted: Vec<(&str, &str)> = labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let count = exposition.value(&format!("{family}_count"), &wanted);
            if !cumulative || last.0 != f64::INFINITY || count != Some(last.1) {
                return Err(MetricsError::Histogram(
                    family.clone(),
                    format!("{labels:?}: buckets {buckets:?}, count {count:?}"),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counters_labels_and_histograms() {
        let text = "# HELP a_total Things.\n# TYPE a_total counter\na_total{reason=\"x\\\"y\",b=\"2\"} 3\n\
                    # TYPE h histogram\nh_bucket{le=\"0.1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.3\nh_count 2\n";
        let exp = parse(text).expect("valid");
        assert_eq!(exp.value("a_total", &[("reason", "x\"y")]), Some(3.0));
        assert_eq!(exp.value("h_count", &[]), Some(2.0));
        assert_eq!(exp.count("a_total", &[("reason", "other")]), 0.0);
    }

    #[test]
    fn rejects_malformed_expositions() {
        for bad in [
            "x 1\n",                                                    // no TYPE
            "# TYPE x gauge\nx{a=\"1\" 1\n",                            // unterminated labels
            "# TYPE x gauge\nx one\n",                                  // bad value
            "# TYPE x gauge\nx 1",                                      // no final newline
            "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 3\n", // inconsistent
            "# TYPE 1x gauge\n",                                        // bad name
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
    }
}
