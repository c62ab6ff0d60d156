//! Tests of the claim matchers.

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

fn table(v: Value) -> Result<Matcher, MatcherError> {
    Matcher::compile(&MatcherSpec::Table(v.as_object().expect("object").clone()))
}

#[test]
fn operators_say_how_to_match() {
    let literal = table(json!({ "equals": "release/*" })).expect("equals");
    assert!(literal.matches(Some(&json!("release/*"))));
    assert!(!literal.matches(Some(&json!("release/1"))));
    let glob = table(json!({ "glob": "release/*" })).expect("glob");
    assert!(glob.matches(Some(&json!("release/1"))));
    let one_of = table(json!({ "one_of": ["a", "b*"] })).expect("one_of");
    assert!(one_of.matches(Some(&json!("b2"))));
    assert!(!one_of.matches(Some(&json!("c"))));
    assert!(
        table(json!({ "equals": true }))
            .expect("bool")
            .matches(Some(&json!("true")))
    );
    assert!(
        table(json!({ "equals": 7 }))
            .expect("int")
            .matches(Some(&json!(7)))
    );
}

#[test]
fn contains_matches_any_element_and_only_it_reads_arrays() {
    let groups = table(json!({ "contains": "deployers" })).expect("contains");
    assert!(groups.matches(Some(&json!(["devs", "deployers"]))));
    assert!(!groups.matches(Some(&json!(["devs", "ops"]))));
    assert!(!groups.matches(Some(&json!([]))));
    // A single value is a one-element array (OIDC `aud`).
    assert!(groups.matches(Some(&json!("deployers"))));
    assert!(!groups.matches(None));
    let nested = table(json!({ "contains": { "glob": "api://*" } })).expect("nested");
    assert!(nested.matches(Some(&json!(["x", "api://default"]))));
    // The short forms never match an array claim, even one holding the value.
    let short = m(MatcherSpec::Text("deployers".into()));
    assert!(!short.matches(Some(&json!(["deployers"]))));
    assert!(
        short
            .hint(Some(&json!(["deployers"])))
            .is_some_and(|h| h.contains("contains"))
    );
    let list = m(MatcherSpec::List(vec!["deployers".into()]));
    assert!(!list.matches(Some(&json!(["deployers"]))));
}

#[test]
fn bad_tables_say_what_is_wrong() {
    assert_eq!(table(json!({})).err(), Some(MatcherError::OperatorCount(0)));
    assert_eq!(
        table(json!({ "equals": "a", "glob": "b" })).err(),
        Some(MatcherError::OperatorCount(2))
    );
    let e = table(json!({ "io": { "namespace": "ci" } })).expect_err("nested table");
    assert!(e.to_string().contains("\"kubernetes.io.namespace\""), "{e}");
    assert!(matches!(
        table(json!({ "glob": 3 })),
        Err(MatcherError::OperatorValue { op: "glob", .. })
    ));
    assert!(matches!(
        table(json!({ "one_of": [1, 2] })),
        Err(MatcherError::OperatorValue { op: "one_of", .. })
    ));
    assert!(matches!(
        table(json!({ "contains": [] })),
        Err(MatcherError::Inner(_))
    ));
    assert!(matches!(
        table(json!({ "equals": 1.5 })),
        Err(MatcherError::OperatorValue { op: "equals", .. })
    ));
}

#[test]
fn matchers_display_what_they_expect() {
    assert_eq!(m(MatcherSpec::Text("a".into())).to_string(), "\"a\"");
    assert_eq!(m(MatcherSpec::Text("a*".into())).to_string(), "glob \"a*\"");
    assert_eq!(
        table(json!({ "contains": ["x", "y"] }))
            .expect("ok")
            .to_string(),
        "contains one of [\"x\", \"y\"]"
    );
}
