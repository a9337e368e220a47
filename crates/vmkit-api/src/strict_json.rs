//! JSON with no key given twice in any object.
//!
//! serde's derived structs (every body of the model, `rate_limiter` objects included)
//! refuse a field given twice, but a free-form value (a [`serde_json::Value`], a map) keeps
//! the last one silently, and `{"is_read_only": true, "is_read_only": false}` must not mean
//! "writable" anywhere. [`parse`] walks the whole document first and refuses any object
//! with a repeated key, naming it, then deserializes as usual, so the rule holds whatever
//! types the model uses.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeOwned, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::Deserializer;

/// Parses `text` as `T`, refusing any object (at any depth) with a key given twice.
pub fn parse<T: DeserializeOwned>(text: &[u8]) -> Result<T, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(text);
    NoDuplicates.deserialize(&mut de)?;
    de.end()?;
    serde_json::from_slice(text)
}

/// A visitor that accepts any JSON value and fails on a repeated key.
#[derive(Clone, Copy)]
struct NoDuplicates;

impl<'de> DeserializeSeed<'de> for NoDuplicates {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NoDuplicates {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            map.next_value_seed(self)?;
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format_args!("duplicate field `{key}`")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MachineConfig;

    #[test]
    fn derived_structs_already_refuse_a_repeated_field() {
        // What serde does on its own (so `parse` adds to it rather than replaces it).
        let e = serde_json::from_str::<MachineConfig>(
            r#"{"vcpu_count": 1, "mem_size_mib": 128, "mem_size_mib": 256}"#,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("duplicate field `mem_size_mib`"),
            "{e}"
        );
    }

    #[test]
    fn a_free_form_value_keeps_the_last_key_without_it() {
        let text = r#"{"limits": {"bandwidth": {"size": 1}, "bandwidth": {"size": 2}}}"#;
        // serde_json alone: the second `bandwidth` wins silently.
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(v["limits"]["bandwidth"]["size"], 2);
        let e = parse::<serde_json::Value>(text.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("duplicate field `bandwidth`"), "{e}");
    }

    #[test]
    fn repeats_are_refused_at_any_depth_and_the_rest_parses() {
        for bad in [
            r#"{"a": 1, "a": 1}"#,
            r#"[{"x": [{"k": 1, "k": 2}]}]"#,
            r#"{"drives": [{"is_read_only": true, "is_read_only": false}]}"#,
        ] {
            let e = parse::<serde_json::Value>(bad.as_bytes()).unwrap_err();
            assert!(e.to_string().contains("duplicate field"), "{bad}: {e}");
        }
        let v: serde_json::Value =
            parse(br#"{"a": {"k": 1}, "b": {"k": [1, 2.5, "s", null, true]}}"#).unwrap();
        assert_eq!(v["b"]["k"][2], "s");
        // Malformed JSON is still malformed, and trailing text is refused.
        assert!(parse::<serde_json::Value>(b"{\"a\": }").is_err());
        assert!(parse::<serde_json::Value>(b"{} {}").is_err());
    }
}
