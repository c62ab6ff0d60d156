//! Claim matchers of a policy rule.
//!
//! GitLab sends booleans (`ref_protected`, `environment_protected`) and ids
//! (`project_id`, `pipeline_id`) as strings, so a boolean matcher also accepts
//! `"true"`/`"false"` and an integer matcher its decimal string. A claim that
//! is missing from the token never matches.
//!
//! The short forms (a string, a list of strings, a boolean, an integer)
//! match a single value: an array claim never satisfies them, so a rule
//! written for `aud = "x"` cannot be widened by a token listing many
//! audiences. A table says how to match, with exactly one operator:
//! `{ equals = "a*b" }` (literal, `*` is not a wildcard), `{ glob = "..." }`,
//! `{ one_of = ["a", "b"] }`, or `{ contains = <matcher> }`: some element of
//! an array claim satisfies the inner matcher (a single value counts as a
//! one-element array, since OIDC allows `aud` either way).

use serde_json::{Map, Value};

use super::config::MatcherSpec;

/// A compiled claim matcher.
#[derive(Debug, Clone)]
pub enum Matcher {
    Bool(bool),
    Integer(i64),
    Text(TextMatcher),
    AnyOf(Vec<TextMatcher>),
    /// Some element of an array claim (or the single value) matches.
    AnyElement(Box<Matcher>),
}

/// An exact string or a glob where `*` matches any run of characters
/// (including `/`) and `?` one character. No other glob syntax is special.
#[derive(Debug, Clone)]
pub enum TextMatcher {
    Exact(String),
    Glob { pattern: String },
}

/// Why a claim matcher in the config cannot be compiled.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MatcherError {
    #[error("an empty list of alternatives would never match")]
    EmptyList,
    #[error(
        "`{0}` is not a valid matcher: use a string (exact or glob), \
         a list of strings, a boolean, an integer, or a table with one of {OPERATORS}"
    )]
    Unsupported(Value),
    #[error(
        "`{0}` is not a matcher operator (use one of {OPERATORS}); to name a nested \
         claim, quote its whole path as the key: \"kubernetes.io.namespace\" = \"ci\""
    )]
    UnknownOperator(String),
    #[error("a matcher table needs exactly one of {OPERATORS}, found {0}")]
    OperatorCount(usize),
    #[error("`{op}` takes {expected}, not `{found}`")]
    OperatorValue {
        op: &'static str,
        expected: &'static str,
        found: Value,
    },
    #[error("in `contains`: {0}")]
    Inner(Box<MatcherError>),
}

/// The operators of the table form, for error messages.
const OPERATORS: &str = "`equals`, `glob`, `one_of`, `contains`";

impl TextMatcher {
    /// Every string is a valid pattern.
    #[must_use]
    pub fn new(pattern: &str) -> TextMatcher {
        if !pattern.contains(['*', '?']) {
            return TextMatcher::Exact(pattern.to_owned());
        }
        TextMatcher::Glob {
            pattern: pattern.to_owned(),
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            TextMatcher::Exact(s) => s == value,
            TextMatcher::Glob { pattern } => wildcard_match(pattern, value),
        }
    }
}

/// Matches by characters, not bytes. Not globset: its `?` takes one byte
/// (so `v?.0` missed `vé.0`) and `**/` is a recursive wildcard (so
/// `a/**/b` matched `a/b`), both unlike what a policy author reads here.
/// On a mismatch it backtracks to the last `*` only: O(pattern × value).
fn wildcard_match(pattern: &str, value: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let v: Vec<char> = value.chars().collect();
    let (mut pi, mut vi) = (0, 0);
    // The last `*` seen, and where in `value` its match currently ends.
    let mut star: Option<(usize, usize)> = None;
    while vi < v.len() {
        if p.get(pi) == Some(&'*') {
            star = Some((pi, vi));
            pi += 1;
        } else if p.get(pi).is_some_and(|&c| c == '?' || c == v[vi]) {
            pi += 1;
            vi += 1;
        } else if let Some((sp, sv)) = star {
            star = Some((sp, sv + 1));
            pi = sp + 1;
            vi = sv + 1;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

impl Matcher {
    /// Compiles the config form; the error says what was wrong with it.
    pub fn compile(spec: &MatcherSpec) -> Result<Matcher, MatcherError> {
        match spec {
            MatcherSpec::Bool(b) => Ok(Matcher::Bool(*b)),
            MatcherSpec::Integer(i) => Ok(Matcher::Integer(*i)),
            MatcherSpec::Text(s) => Ok(Matcher::Text(TextMatcher::new(s))),
            MatcherSpec::List(items) if items.is_empty() => Err(MatcherError::EmptyList),
            MatcherSpec::List(items) => Ok(Matcher::AnyOf(
                items.iter().map(|s| TextMatcher::new(s)).collect(),
            )),
            MatcherSpec::Table(table) => compile_table(table),
            MatcherSpec::Unsupported(v) => Err(MatcherError::Unsupported(v.clone())),
        }
    }

    /// Why `actual` cannot match this kind of matcher at all, when that is
    /// the likely mistake (an array claim under a single-value matcher).
    #[must_use]
    pub fn hint(&self, actual: Option<&Value>) -> Option<&'static str> {
        match (self, actual) {
            (Matcher::AnyElement(_), _) => None,
            (_, Some(Value::Array(_))) => {
                Some("the claim is an array: match an element with { contains = ... }")
            }
            (_, Some(Value::Object(_))) => {
                Some("the claim is an object: name a claim inside it by path (a.b)")
            }
            (_, None) => Some("the token has no such claim"),
            _ => None,
        }
    }

    /// Whether the claim value (`None` when absent) satisfies the matcher.
    pub fn matches(&self, claim: Option<&Value>) -> bool {
        let Some(value) = claim else { return false };
        match self {
            Matcher::Bool(want) => match value {
                Value::Bool(b) => b == want,
                Value::String(s) => s == if *want { "true" } else { "false" },
                _ => false,
            },
            Matcher::Integer(want) => match value {
                Value::Number(n) => n.as_i64() == Some(*want),
                // Exactly the decimal form: `"01042"` or `"+1042"` is not
                // project 1042's id as GitLab writes it.
                Value::String(s) => *s == want.to_string(),
                _ => false,
            },
            Matcher::Text(m) => scalar_text(value).is_some_and(|s| m.matches(&s)),
            Matcher::AnyOf(ms) => {
                scalar_text(value).is_some_and(|s| ms.iter().any(|m| m.matches(&s)))
            }
            Matcher::AnyElement(inner) => match value {
                Value::Array(items) => items.iter().any(|v| inner.matches(Some(v))),
                single => inner.matches(Some(single)),
            },
        }
    }
}

/// The table form: exactly one operator.
fn compile_table(table: &Map<String, Value>) -> Result<Matcher, MatcherError> {
    let mut ops = table.iter();
    let (Some((op, value)), None) = (ops.next(), ops.next()) else {
        return Err(MatcherError::OperatorCount(table.len()));
    };
    let wrong = |op, expected| MatcherError::OperatorValue {
        op,
        expected,
        found: value.clone(),
    };
    match op.as_str() {
        "equals" => match value {
            Value::String(s) => Ok(Matcher::Text(TextMatcher::Exact(s.clone()))),
            Value::Bool(b) => Ok(Matcher::Bool(*b)),
            Value::Number(n) => n
                .as_i64()
                .map(Matcher::Integer)
                .ok_or_else(|| wrong("equals", "a string, a boolean or an integer")),
            _ => Err(wrong("equals", "a string, a boolean or an integer")),
        },
        "glob" => match value {
            Value::String(s) => Ok(Matcher::Text(TextMatcher::Glob { pattern: s.clone() })),
            _ => Err(wrong("glob", "a string pattern")),
        },
        "one_of" => {
            let items: Vec<String> = serde_json::from_value(value.clone())
                .map_err(|_| wrong("one_of", "a list of strings"))?;
            Matcher::compile(&MatcherSpec::List(items))
        }
        "contains" => {
            let spec: MatcherSpec = serde_json::from_value(value.clone())
                .map_err(|_| wrong("contains", "a matcher"))?;
            Matcher::compile(&spec)
                .map(|m| Matcher::AnyElement(Box::new(m)))
                .map_err(|e| MatcherError::Inner(Box::new(e)))
        }
        other => Err(MatcherError::UnknownOperator(other.to_owned())),
    }
}

/// What the matcher expects, as `policy explain` shows it.
impl std::fmt::Display for Matcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Matcher::Bool(b) => write!(f, "{b}"),
            Matcher::Integer(i) => write!(f, "{i}"),
            Matcher::Text(t) => write!(f, "{t}"),
            Matcher::AnyOf(ms) => {
                f.write_str("one of [")?;
                for (i, m) in ms.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{m}")?;
                }
                f.write_str("]")
            }
            Matcher::AnyElement(inner) => write!(f, "contains {inner}"),
        }
    }
}

impl std::fmt::Display for TextMatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TextMatcher::Exact(s) => write!(f, "{s:?}"),
            TextMatcher::Glob { pattern } => write!(f, "glob {pattern:?}"),
        }
    }
}

/// The text a string matcher compares against: strings as they are, numbers
/// in decimal; other JSON types never match a string.
fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
#[path = "matcher_tests.rs"]
mod tests;
