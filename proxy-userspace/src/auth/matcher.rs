//! Claim matchers of a policy rule.
//!
//! GitLab sends booleans (`ref_protected`, `environment_protected`) and ids
//! (`project_id`, `pipeline_id`) as strings, so a boolean matcher also accepts
//! `"true"`/`"false"` and an integer matcher its decimal string. A claim that
//! is missing from the token never matches.

use globset::{Glob, GlobBuilder, GlobMatcher};
use serde_json::Value;

use super::config::MatcherSpec;

/// A compiled claim matcher.
#[derive(Debug, Clone)]
pub enum Matcher {
    Bool(bool),
    Integer(i64),
    Text(TextMatcher),
    AnyOf(Vec<TextMatcher>),
}

/// An exact string or a glob where `*` matches any run of characters
/// (including `/`) and `?` one character. No other glob syntax is special.
#[derive(Debug, Clone)]
pub enum TextMatcher {
    Exact(String),
    Glob {
        pattern: String,
        matcher: GlobMatcher,
    },
}

impl TextMatcher {
    pub fn new(pattern: &str) -> Result<TextMatcher, String> {
        if !pattern.contains(['*', '?']) {
            return Ok(TextMatcher::Exact(pattern.to_owned()));
        }
        // Escape everything globset would otherwise treat as syntax, so only
        // `*` and `?` are wildcards: `[`, `{` in a ref name stay literal.
        let mut escaped = String::with_capacity(pattern.len() + 4);
        for c in pattern.chars() {
            if matches!(c, '[' | ']' | '{' | '}' | '\\' | '!') {
                escaped.push('\\');
            }
            escaped.push(c);
        }
        let glob: Glob = GlobBuilder::new(&escaped)
            .literal_separator(false)
            .backslash_escape(true)
            .empty_alternates(false)
            .build()
            .map_err(|e| format!("bad pattern `{pattern}`: {e}"))?;
        Ok(TextMatcher::Glob {
            pattern: pattern.to_owned(),
            matcher: glob.compile_matcher(),
        })
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            TextMatcher::Exact(s) => s == value,
            TextMatcher::Glob { matcher, .. } => matcher.is_match(value),
        }
    }
}

impl Matcher {
    /// Compiles the config form; the error says what was wrong with it.
    pub fn compile(spec: &MatcherSpec) -> Result<Matcher, String> {
        match spec {
            MatcherSpec::Bool(b) => Ok(Matcher::Bool(*b)),
            MatcherSpec::Integer(i) => Ok(Matcher::Integer(*i)),
            MatcherSpec::Text(s) => TextMatcher::new(s).map(Matcher::Text),
            MatcherSpec::List(items) if items.is_empty() => {
                Err("an empty list of alternatives would never match".to_owned())
            }
            MatcherSpec::List(items) => items
                .iter()
                .map(|s| TextMatcher::new(s))
                .collect::<Result<Vec<_>, _>>()
                .map(Matcher::AnyOf),
            MatcherSpec::Unsupported(v) => Err(format!(
                "`{v}` is not a valid matcher: use a string (exact or glob), \
                 a list of strings, a boolean or an integer"
            )),
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
                Value::String(s) => s.parse::<i64>().ok() == Some(*want),
                _ => false,
            },
            Matcher::Text(m) => scalar_text(value).is_some_and(|s| m.matches(&s)),
            Matcher::AnyOf(ms) => {
                scalar_text(value).is_some_and(|s| ms.iter().any(|m| m.matches(&s)))
            }
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
mod tests {
    use super::*;
    use serde_json::json;

    fn m(spec: MatcherSpec) -> Matcher {
        Matcher::compile(&spec).expect("valid matcher")
    }

    #[test]
    fn exact_matches_only_the_same_string() {
        let exact = m(MatcherSpec::Text("group/app".into()));
        assert!(exact.matches(Some(&json!("group/app"))));
        assert!(!exact.matches(Some(&json!("group/app2"))));
        assert!(!exact.matches(Some(&json!(true))));
        assert!(!exact.matches(None));
    }

    #[test]
    fn glob_supports_star_and_question_mark_only() {
        let g = m(MatcherSpec::Text("release/*".into()));
        assert!(g.matches(Some(&json!("release/1.2"))));
        assert!(g.matches(Some(&json!("release/1.2/hotfix"))));
        assert!(!g.matches(Some(&json!("main"))));
        let q = m(MatcherSpec::Text("v?.0".into()));
        assert!(q.matches(Some(&json!("v1.0"))));
        assert!(!q.matches(Some(&json!("v10.0"))));
        let literal = m(MatcherSpec::Text("x[1]{a,b}*".into()));
        assert!(literal.matches(Some(&json!("x[1]{a,b}-tail"))));
        assert!(!literal.matches(Some(&json!("x1a-tail"))));
    }

    #[test]
    fn list_matches_any_alternative() {
        let l = m(MatcherSpec::List(vec!["branch".into(), "tag".into()]));
        assert!(l.matches(Some(&json!("tag"))));
        assert!(!l.matches(Some(&json!("merge_request"))));
        assert!(Matcher::compile(&MatcherSpec::List(vec![])).is_err());
    }

    #[test]
    fn bool_matches_json_bool_and_gitlab_strings() {
        let t = m(MatcherSpec::Bool(true));
        assert!(t.matches(Some(&json!(true))));
        assert!(t.matches(Some(&json!("true"))));
        assert!(!t.matches(Some(&json!("false"))));
        assert!(!t.matches(Some(&json!(false))));
        assert!(!t.matches(Some(&json!("yes"))));
        let f = m(MatcherSpec::Bool(false));
        assert!(f.matches(Some(&json!("false"))));
        assert!(!f.matches(None));
    }

    #[test]
    fn integer_matches_number_and_decimal_string() {
        let i = m(MatcherSpec::Integer(42));
        assert!(i.matches(Some(&json!(42))));
        assert!(i.matches(Some(&json!("42"))));
        assert!(!i.matches(Some(&json!("420"))));
        assert!(Matcher::compile(&MatcherSpec::Unsupported(json!(1.5))).is_err());
    }
}
