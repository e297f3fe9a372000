//! Params as JSON (`params.json`, `--params-json`, schedule files). JSON has no NaN or
//! infinity, so a non-finite float is written as `{"$float": "NaN"}` (or `"inf"`, `"-inf"`) and
//! read back as that float: `--set x=inf` reaches a resumed run as `inf`, not as `()`.

use anyhow::{bail, Result};
use rhai::{Array, Dynamic, Map};
use serde_json::Value;

/// The key of a tagged non-finite float.
pub const FLOAT_TAG: &str = "$float";

/// `x` as JSON: a number, or the tagged form when it is not finite.
pub fn float_to_json(x: f64) -> Value {
    let text = if x.is_nan() {
        "NaN"
    } else if x == f64::INFINITY {
        "inf"
    } else if x == f64::NEG_INFINITY {
        "-inf"
    } else {
        return serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number);
    };
    serde_json::json!({ FLOAT_TAG: text })
}

/// A script value as JSON (maps and arrays walked, non-finite floats tagged).
pub fn to_json(value: &Dynamic) -> Result<Value> {
    if let Ok(x) = value.as_float() {
        return Ok(float_to_json(x));
    }
    if let Some(map) = value.read_lock::<Map>() {
        return map
            .iter()
            .map(|(k, v)| Ok((k.to_string(), to_json(v)?)))
            .collect::<Result<serde_json::Map<_, _>>>()
            .map(Value::Object);
    }
    if let Some(items) = value.read_lock::<Array>() {
        return items
            .iter()
            .map(to_json)
            .collect::<Result<_>>()
            .map(Value::Array);
    }
    rhai::serde::from_dynamic(value).map_err(|e| anyhow::anyhow!("{e}"))
}

/// JSON as a script value, tagged floats restored.
pub fn from_json(value: Value) -> Result<Dynamic> {
    Ok(match value {
        Value::Object(map) => {
            if let Some(x) = tagged_float(&map) {
                return Ok(Dynamic::from_float(x));
            }
            let mut out = Map::new();
            for (k, v) in map {
                out.insert(k.into(), from_json(v)?);
            }
            Dynamic::from_map(out)
        }
        Value::Array(items) => {
            Dynamic::from_array(items.into_iter().map(from_json).collect::<Result<_>>()?)
        }
        other => rhai::serde::to_dynamic(other).map_err(|e| anyhow::anyhow!("{e}"))?,
    })
}

/// A JSON object as a params map; anything else is an error.
pub fn params_from_json(value: Value) -> Result<Map> {
    if !value.is_object() {
        bail!("not a JSON object");
    }
    Ok(from_json(value)?.cast::<Map>())
}

fn tagged_float(map: &serde_json::Map<String, Value>) -> Option<f64> {
    if map.len() != 1 {
        return None;
    }
    match map.get(FLOAT_TAG)?.as_str()? {
        "NaN" => Some(f64::NAN),
        "inf" => Some(f64::INFINITY),
        "-inf" => Some(f64::NEG_INFINITY),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_floats_round_trip_and_plain_values_stay_plain() {
        let mut inner = Map::new();
        inner.insert("lr".into(), Dynamic::from_float(f64::NEG_INFINITY));
        let mut params = Map::new();
        params.insert("a".into(), Dynamic::from_float(f64::NAN));
        params.insert("b".into(), Dynamic::from_float(f64::INFINITY));
        params.insert("c".into(), Dynamic::from_float(0.5));
        params.insert("n".into(), Dynamic::from_int(3));
        params.insert("s".into(), Dynamic::from("inf".to_string()));
        params.insert("m".into(), Dynamic::from_map(inner));
        params.insert(
            "v".into(),
            Dynamic::from_array(vec![Dynamic::from_float(f64::INFINITY), Dynamic::UNIT]),
        );
        let json = to_json(&Dynamic::from_map(params)).unwrap();
        assert_eq!(json["a"], serde_json::json!({"$float": "NaN"}));
        assert_eq!(json["m"]["lr"], serde_json::json!({"$float": "-inf"}));
        assert_eq!(json["c"], 0.5);
        assert_eq!(json["s"], "inf", "a string stays a string");
        // Through text, as in params.json.
        let back = params_from_json(serde_json::from_str(&json.to_string()).unwrap()).unwrap();
        assert!(back["a"].as_float().unwrap().is_nan());
        assert_eq!(back["b"].as_float().unwrap(), f64::INFINITY);
        assert_eq!(back["c"].as_float().unwrap(), 0.5);
        assert_eq!(back["n"].as_int().unwrap(), 3);
        assert_eq!(back["s"].clone().into_string().unwrap(), "inf");
        let m = back["m"].read_lock::<Map>().unwrap();
        assert_eq!(m["lr"].as_float().unwrap(), f64::NEG_INFINITY);
        let v = back["v"].read_lock::<Array>().unwrap();
        assert_eq!(v[0].as_float().unwrap(), f64::INFINITY);
        assert!(v[1].is_unit());
        assert!(params_from_json(serde_json::json!([1])).is_err());
    }
}
