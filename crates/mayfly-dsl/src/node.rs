//! A YAML tree in which every node remembers where it came from.
//!
//! serde-saphyr gives us `Spanned<T>`; we deserialize the whole document into this tree once,
//! so that every later validation or template error can name file:line:col precisely.

use serde::Deserialize;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use serde_saphyr::Spanned;
use std::fmt;

/// 1-based source position of a YAML node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Loc {
    pub line: u32,
    pub col: u32,
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

/// A YAML node with its location.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub loc: Loc,
    pub v: NodeV,
}

/// The node's value. Maps keep document order (it matters for exclusive arcs and `set`).
#[derive(Clone, Debug, PartialEq)]
pub enum NodeV {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(String, Loc, Node)>),
}

impl Node {
    /// Look up a key in a mapping node.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.v {
            NodeV::Map(entries) => entries.iter().find(|(k, _, _)| k == key).map(|(_, _, n)| n),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.v {
            NodeV::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_map(&self) -> Option<&[(String, Loc, Node)]> {
        match &self.v {
            NodeV::Map(m) => Some(m),
            _ => None,
        }
    }

    pub fn as_seq(&self) -> Option<&[Node]> {
        match &self.v {
            NodeV::Seq(s) => Some(s),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self.v, NodeV::Null)
    }

    /// Short human name of the node's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self.v {
            NodeV::Null => "null",
            NodeV::Bool(_) => "a boolean",
            NodeV::Int(_) => "an integer",
            NodeV::Float(_) => "a number",
            NodeV::Str(_) => "a string",
            NodeV::Seq(_) => "a list",
            NodeV::Map(_) => "a mapping",
        }
    }

    /// Plain JSON value (locations dropped).
    pub fn to_json(&self) -> Value {
        match &self.v {
            NodeV::Null => Value::Null,
            NodeV::Bool(b) => Value::Bool(*b),
            NodeV::Int(i) => Value::Number((*i).into()),
            NodeV::Float(f) => Number::from_f64(*f)
                .map(Value::Number)
                .unwrap_or(Value::Null),
            NodeV::Str(s) => Value::String(s.clone()),
            NodeV::Seq(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            NodeV::Map(entries) => {
                let mut m = Map::new();
                for (k, _, v) in entries {
                    m.insert(k.clone(), v.to_json());
                }
                Value::Object(m)
            }
        }
    }

    /// Build a location-less node from JSON (used for values produced at run time).
    pub fn from_json(v: &Value, loc: Loc) -> Node {
        let nv = match v {
            Value::Null => NodeV::Null,
            Value::Bool(b) => NodeV::Bool(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => NodeV::Int(i),
                None => NodeV::Float(n.as_f64().unwrap_or(0.0)),
            },
            Value::String(s) => NodeV::Str(s.clone()),
            Value::Array(a) => NodeV::Seq(a.iter().map(|x| Node::from_json(x, loc)).collect()),
            Value::Object(m) => NodeV::Map(
                m.iter()
                    .map(|(k, x)| (k.clone(), loc, Node::from_json(x, loc)))
                    .collect(),
            ),
        };
        Node { loc, v: nv }
    }
}

fn loc_of(l: &serde_saphyr::Location) -> Loc {
    Loc {
        line: l.line() as u32,
        col: l.column() as u32,
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Spanned::<NodeV>::deserialize(d)?;
        Ok(Node {
            loc: loc_of(&s.referenced),
            v: s.value,
        })
    }
}

/// A mapping key: YAML allows scalars of any type; we stringify them.
struct Key(String);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KV;
        impl Visitor<'_> for KV {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a scalar mapping key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(Key(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key, E> {
                Ok(Key(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Key, E> {
                Ok(Key("null".into()))
            }
        }
        d.deserialize_string(KV)
    }
}

impl<'de> Deserialize<'de> for NodeV {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct NV;
        impl<'de> Visitor<'de> for NV {
            type Value = NodeV;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<NodeV, E> {
                Ok(NodeV::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<NodeV, E> {
                Ok(NodeV::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<NodeV, E> {
                Ok(i64::try_from(v)
                    .map(NodeV::Int)
                    .unwrap_or(NodeV::Float(v as f64)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<NodeV, E> {
                Ok(NodeV::Float(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<NodeV, E> {
                Ok(NodeV::Str(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<NodeV, E> {
                Ok(NodeV::Str(v))
            }
            fn visit_unit<E: de::Error>(self) -> Result<NodeV, E> {
                Ok(NodeV::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<NodeV, E> {
                Ok(NodeV::Null)
            }
            fn visit_some<D2: de::Deserializer<'de>>(self, d: D2) -> Result<NodeV, D2::Error> {
                NodeV::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<NodeV, A::Error> {
                let mut out = Vec::new();
                while let Some(n) = a.next_element::<Node>()? {
                    out.push(n);
                }
                Ok(NodeV::Seq(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<NodeV, A::Error> {
                let mut out: Vec<(String, Loc, Node)> = Vec::new();
                while let Some(k) = a.next_key::<Spanned<Key>>()? {
                    let v: Node = a.next_value()?;
                    out.push((k.value.0, loc_of(&k.referenced), v));
                }
                Ok(NodeV::Map(out))
            }
        }
        d.deserialize_any(NV)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_carry_line_and_column() {
        let src = "a: 1\nb:\n  - x\n  - {c: true}\nd: \"s\"\n";
        let n: Node = serde_saphyr::from_str(src).expect("parse");
        let b = n.get("b").expect("b");
        let items = b.as_seq().expect("seq");
        assert_eq!(items[0].loc, Loc { line: 3, col: 5 });
        assert_eq!(items[0].as_str(), Some("x"));
        let c = items[1].get("c").expect("c");
        assert_eq!(c.v, NodeV::Bool(true));
        assert_eq!(c.loc.line, 4);
        assert_eq!(n.get("d").map(|d| d.loc.line), Some(5));
        assert_eq!(
            n.to_json(),
            serde_json::json!({"a": 1, "b": ["x", {"c": true}], "d": "s"})
        );
    }

    #[test]
    fn map_order_is_preserved() {
        let n: Node = serde_saphyr::from_str("z: 1\na: 2\nm: 3\n").expect("parse");
        let keys: Vec<&str> = n
            .as_map()
            .expect("map")
            .iter()
            .map(|(k, _, _)| k.as_str())
            .collect();
        assert_eq!(keys, ["z", "a", "m"]);
    }
}
