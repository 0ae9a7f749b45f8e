//! Property predicates: `{amount: {gt: 0}, plan: pro, country: {in: [DE, FR]}}`. A bare
//! value means equality; every named property must match.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Property name → what its value must satisfy; all must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Predicates(pub BTreeMap<String, Cmp>);

/// A test of one value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Cmp {
    Ops(Box<Ops>),
    /// Equal to this value.
    Equals(Value),
}

/// Operators, all of which must hold. Order comparisons hold between two numbers or two
/// strings, never across types; a missing property fails every test but `exists: false`
/// and `ne`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ops {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eq: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ne: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gt: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gte: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lt: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lte: Option<Value>,
    #[serde(default, rename = "in", skip_serializing_if = "Option::is_none")]
    pub in_: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exists: Option<bool>,
    /// A list that holds the value, or a string that holds the substring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contains: Option<Value>,
}

impl Predicates {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `props` satisfies every predicate.
    pub fn matches(&self, props: &Map<String, Value>) -> bool {
        self.0.iter().all(|(name, cmp)| cmp.holds(props.get(name)))
    }
}

impl Cmp {
    fn holds(&self, v: Option<&Value>) -> bool {
        match self {
            Cmp::Equals(want) => v.is_some_and(|v| same(v, want)),
            Cmp::Ops(ops) => ops.holds(v),
        }
    }
}

impl Ops {
    fn holds(&self, v: Option<&Value>) -> bool {
        if let Some(e) = self.exists
            && e != v.is_some_and(|v| !v.is_null())
        {
            return false;
        }
        if let Some(ne) = &self.ne
            && v.is_some_and(|v| same(v, ne))
        {
            return false;
        }
        let tests_value = self.eq.is_some()
            || self.gt.is_some()
            || self.gte.is_some()
            || self.lt.is_some()
            || self.lte.is_some()
            || self.in_.is_some()
            || self.contains.is_some();
        if !tests_value {
            return true;
        }
        let Some(v) = v else { return false };
        let ord = |b: &Option<Value>, ok: fn(Ordering) -> bool| {
            b.as_ref().is_none_or(|b| order(v, b).is_some_and(ok))
        };
        self.eq.as_ref().is_none_or(|e| same(v, e))
            && ord(&self.gt, |o| o == Ordering::Greater)
            && ord(&self.gte, |o| o != Ordering::Less)
            && ord(&self.lt, |o| o == Ordering::Less)
            && ord(&self.lte, |o| o != Ordering::Greater)
            && self
                .in_
                .as_ref()
                .is_none_or(|set| set.iter().any(|x| same(v, x)))
            && self.contains.as_ref().is_none_or(|c| match (v, c) {
                (Value::Array(items), c) => items.iter().any(|x| same(x, c)),
                (Value::String(s), Value::String(sub)) => s.contains(sub.as_str()),
                _ => false,
            })
    }
}

/// Equality, with numbers compared by value (`1` equals `1.0`).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

fn order(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(yaml: &str) -> Predicates {
        serde_norway::from_str(yaml).unwrap()
    }

    fn props(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn operators_and_bare_values() {
        let pr = p("{amount: {gt: 0, lte: 100}, plan: pro, country: {in: [DE, FR]}}");
        assert!(pr.matches(&props(json!({"amount": 5, "plan": "pro", "country": "FR"}))));
        assert!(!pr.matches(&props(json!({"amount": 0, "plan": "pro", "country": "FR"}))));
        assert!(!pr.matches(&props(
            json!({"amount": 101, "plan": "pro", "country": "FR"})
        )));
        assert!(!pr.matches(&props(
            json!({"amount": 5, "plan": "free", "country": "FR"})
        )));
        assert!(!pr.matches(&props(json!({"amount": 5, "plan": "pro"}))));
        // Order tests never cross types.
        assert!(!pr.matches(&props(
            json!({"amount": "5", "plan": "pro", "country": "DE"})
        )));
        assert!(p("{n: 1}").matches(&props(json!({"n": 1.0}))));
    }

    #[test]
    fn exists_ne_and_contains() {
        assert!(p("{x: {exists: false}}").matches(&props(json!({}))));
        assert!(p("{x: {exists: false}}").matches(&props(json!({"x": null}))));
        assert!(!p("{x: {exists: true}}").matches(&props(json!({}))));
        assert!(p("{x: {ne: 3}}").matches(&props(json!({}))));
        assert!(!p("{x: {ne: 3}}").matches(&props(json!({"x": 3}))));
        assert!(p("{tags: {contains: vip}}").matches(&props(json!({"tags": ["a", "vip"]}))));
        assert!(!p("{tags: {contains: vip}}").matches(&props(json!({"tags": ["a"]}))));
        assert!(p("{email: {contains: '@x.io'}}").matches(&props(json!({"email": "a@x.io"}))));
    }

    #[test]
    fn a_map_with_other_keys_is_an_equality_test() {
        let pr = p("{address: {city: Berlin}}");
        assert!(pr.matches(&props(json!({"address": {"city": "Berlin"}}))));
        assert!(!pr.matches(&props(json!({"address": {"city": "Paris"}}))));
    }
}
