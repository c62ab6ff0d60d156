//! Claim matchers of a policy rule.
//!
//! GitLab sends booleans (`ref_protected`, `environment_protected`) and ids
//! (`project_id`, `pipeline_id`) as strings, so a boolean matcher also accepts
//! `"true"`/`"false"` and an integer matcher its decimal string. A claim that
//! is missing from the token never matches.

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
    Glob { pattern: String },
}

/// Why a claim matcher in the config cannot be compiled.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MatcherError {
    #[error("an empty list of alternatives would never match")]
    EmptyList,
    #[error(
        "`{0}` is not a valid matcher: use a string (exact or glob), \
         a list of strings, a boolean or an integer"
    )]
    Unsupported(Value),
}

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
            MatcherSpec::Unsupported(v) => Err(MatcherError::Unsupported(v.clone())),
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
    fn glob_wildcards_take_characters_and_double_star_is_two_stars() {
        let q = m(MatcherSpec::Text("v?.0".into()));
        assert!(q.matches(Some(&json!("vé.0"))));
        let dd = m(MatcherSpec::Text("a/**/b".into()));
        assert!(!dd.matches(Some(&json!("a/b"))));
        assert!(dd.matches(Some(&json!("a/x/y/b"))));
        let lead = m(MatcherSpec::Text("**/main".into()));
        assert!(!lead.matches(Some(&json!("main"))));
        assert!(m(MatcherSpec::Text("a**b".into())).matches(Some(&json!("a-b"))));
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
        assert!(!i.matches(Some(&json!("042"))));
        assert!(!i.matches(Some(&json!("+42"))));
        assert!(m(MatcherSpec::Integer(-7)).matches(Some(&json!("-7"))));
        assert!(Matcher::compile(&MatcherSpec::Unsupported(json!(1.5))).is_err());
    }
}
