//! Option maps (`#{beta: 500, eps: 0.1}`): unknown keys are named with the accepted list,
//! and ints are accepted wherever floats are expected.

use rhai::{Dynamic, Map};

pub struct Options<'a> {
    map: &'a Map,
    func: &'a str,
}

impl<'a> Options<'a> {
    /// Check that every key of `map` is one of `accepted`.
    pub fn new(map: &'a Map, func: &'a str, accepted: &[&str]) -> Result<Self, String> {
        let mut unknown: Vec<&str> = map
            .keys()
            .map(|k| k.as_str())
            .filter(|k| !accepted.contains(k))
            .collect();
        if !unknown.is_empty() {
            unknown.sort();
            let mut accepted = accepted.to_vec();
            accepted.sort();
            return Err(format!(
                "{func}: unknown option{} {}; accepted: {}",
                if unknown.len() > 1 { "s" } else { "" },
                unknown
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
                accepted.join(", ")
            ));
        }
        Ok(Self { map, func })
    }

    fn get(&self, key: &str) -> Option<&Dynamic> {
        self.map.get(key).filter(|v| !v.is_unit())
    }

    fn wrong_type(&self, key: &str, expected: &str, value: &Dynamic) -> String {
        format!(
            "{}: option `{key}` must be {expected}, got {} ({value})",
            self.func,
            value.type_name()
        )
    }

    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => dynamic_f64(v)
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a number", v)),
        }
    }

    pub fn f64(&self, key: &str, default: f64) -> Result<f64, String> {
        Ok(self.opt_f64(key)?.unwrap_or(default))
    }

    pub fn opt_i64(&self, key: &str) -> Result<Option<i64>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_int()
                .map(Some)
                .map_err(|_| self.wrong_type(key, "an integer", v)),
        }
    }

    pub fn i64(&self, key: &str, default: i64) -> Result<i64, String> {
        Ok(self.opt_i64(key)?.unwrap_or(default))
    }

    pub fn usize(&self, key: &str, default: usize) -> Result<usize, String> {
        let v = self.i64(key, default as i64)?;
        usize::try_from(v)
            .map_err(|_| format!("{}: option `{key}` must be >= 0, got {v}", self.func))
    }

    pub fn bool(&self, key: &str, default: bool) -> Result<bool, String> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .map_err(|_| self.wrong_type(key, "true or false", v)),
        }
    }

    pub fn opt_string(&self, key: &str) -> Result<Option<String>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .clone()
                .into_string()
                .map(Some)
                .map_err(|_| self.wrong_type(key, "a string", v)),
        }
    }

    pub fn string(&self, key: &str, default: &str) -> Result<String, String> {
        Ok(self.opt_string(key)?.unwrap_or_else(|| default.to_string()))
    }

    /// A string option restricted to `choices`.
    pub fn choice(&self, key: &str, default: &str, choices: &[&str]) -> Result<String, String> {
        let v = self.string(key, default)?;
        if choices.contains(&v.as_str()) {
            Ok(v)
        } else {
            Err(format!(
                "{}: option `{key}` = `{v}` is not one of: {}",
                self.func,
                choices.join(", ")
            ))
        }
    }

    pub fn opt_dynamic(&self, key: &str) -> Option<Dynamic> {
        self.get(key).cloned()
    }

    pub fn opt_typed<T: Clone + 'static>(
        &self,
        key: &str,
        type_name: &str,
    ) -> Result<Option<T>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .clone()
                .try_cast::<T>()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, type_name, v)),
        }
    }
}

/// INT or FLOAT as f64.
pub fn dynamic_f64(v: &Dynamic) -> Option<f64> {
    v.as_float()
        .ok()
        .or_else(|| v.as_int().ok().map(|i| i as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, Dynamic)]) -> Map {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), v.clone()))
            .collect()
    }

    #[test]
    fn unknown_key_is_named_with_accepted_list() {
        let m = map(&[
            ("beta", Dynamic::from(1_i64)),
            ("bta", Dynamic::from(2_i64)),
        ]);
        let err = Options::new(&m, "lpo_loss", &["beta", "eps"])
            .err()
            .unwrap();
        assert!(
            err.contains("`bta`") && err.contains("accepted: beta, eps"),
            "{err}"
        );
    }

    #[test]
    fn ints_accepted_as_floats_and_types_checked() {
        let m = map(&[
            ("beta", Dynamic::from(500_i64)),
            ("mode", Dynamic::from(3.5_f64)),
        ]);
        let o = Options::new(&m, "f", &["beta", "mode", "eps"]).unwrap();
        assert_eq!(o.f64("beta", 0.0).unwrap(), 500.0);
        assert_eq!(o.f64("eps", 0.1).unwrap(), 0.1);
        assert!(o
            .string("mode", "x")
            .unwrap_err()
            .contains("must be a string"));
    }
}
