//! What one LRM training batch asks for, as scripts write it (`data.batch(indices, #{...})`);
//! the RNG, VAE and scheduler come beside these settings.

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

/// The LRM training timesteps: 1, 51, ..., 951.
pub fn default_timesteps() -> Vec<i64> {
    (0..20).map(|i| 1 + 50 * i).collect()
}

/// What one batch asks for (the plain options of `data.batch(indices, #{...})`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct BatchSettings {
    /// Image side after resize + centre crop (image sources only).
    pub resolution: usize,
    /// The timesteps to draw from (uniformly): an array, or one int for a fixed t.
    #[serde(deserialize_with = "int_or_ints")]
    #[schemars(with = "IntOrInts")]
    pub timesteps: Vec<i64>,
    /// Each image its own timestep (the aux comparison pairs) instead of one per pair.
    pub per_image_t: bool,
    /// Return the clean latents (no noise; `t` still says what was asked).
    pub clean: bool,
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self {
            resolution: 512,
            timesteps: default_timesteps(),
            per_image_t: false,
            clean: false,
        }
    }
}

/// One int or an array of ints (the schema of [`BatchSettings::timesteps`]).
#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum IntOrInts {
    One(i64),
    Many(Vec<i64>),
}

fn int_or_ints<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<i64>, D::Error> {
    struct Visitor;
    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = Vec<i64>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an int or an array of ints")
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Vec<i64>, E> {
            Ok(vec![v])
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Vec<i64>, E> {
            i64::try_from(v).map(|v| vec![v]).map_err(E::custom)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> std::result::Result<Vec<i64>, A::Error> {
            let mut out = Vec::new();
            while let Some(t) = seq.next_element::<i64>()? {
                out.push(t);
            }
            Ok(out)
        }
    }
    d.deserialize_any(Visitor)
}
