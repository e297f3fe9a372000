//! A var builder over loaded weights that (a) fails with the file and key at fault for a
//! missing or mis-shaped tensor (candle-nn's `VarMap` backend would silently initialise a
//! missing trainable tensor) and (b) records which tensors the model actually took, so the
//! trainable list holds exactly the model's parameters.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::loading::{WeightMode, Weights};

struct Recording {
    tensors: HashMap<String, Tensor>,
    used: Mutex<BTreeSet<String>>,
    source: String,
}

struct Shared(Arc<Recording>);

impl Recording {
    fn take(&self, name: &str) -> candle_core::Result<Tensor> {
        let t = self.tensors.get(name).cloned().ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: missing tensor `{name}`", self.source))
        })?;
        self.used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string());
        Ok(t)
    }
}

impl SimpleBackend for Shared {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.0.take(name)?;
        if t.shape() != &s {
            candle_core::bail!(
                "{}: tensor `{name}` has shape {:?}, expected {:?}",
                self.0.source,
                t.dims(),
                s.dims()
            );
        }
        t.to_device(dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.take(name)?.to_device(dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.tensors.contains_key(name)
    }
}

/// What a model keeps after construction: its trainable `Var`s (empty when frozen).
#[derive(Clone, Default)]
pub struct Params {
    vars: Vec<(String, Var)>,
    count: usize,
}

/// Hands out tensors to a model's constructor, then tells which were taken.
pub struct ParamSource {
    rec: Arc<Recording>,
    vars: Option<HashMap<String, Var>>,
    dtype: DType,
    device: Device,
}

impl ParamSource {
    /// Frozen: plain tensors (no graph). Trainable: every float tensor becomes a `Var`.
    pub fn new(weights: Weights, mode: WeightMode) -> Result<Self> {
        let source = weights.describe();
        let (dtype, device) = (weights.dtype, weights.device.clone());
        let mut tensors = weights.tensors;
        let vars = match mode {
            WeightMode::Frozen => None,
            WeightMode::Trainable => {
                let mut vars = HashMap::new();
                for (name, t) in tensors.iter_mut() {
                    if t.dtype().is_float() {
                        let v = Var::from_tensor(t)?;
                        *t = v.as_tensor().clone();
                        vars.insert(name.clone(), v);
                    }
                }
                Some(vars)
            }
        };
        Ok(Self {
            rec: Arc::new(Recording {
                tensors,
                used: Mutex::new(BTreeSet::new()),
                source,
            }),
            vars,
            dtype,
            device,
        })
    }

    pub fn var_builder(&self) -> VarBuilder<'static> {
        VarBuilder::from_backend(
            Box::new(Shared(self.rec.clone())),
            self.dtype,
            self.device.clone(),
        )
    }

    pub fn source(&self) -> &str {
        &self.rec.source
    }

    /// Whether the weights hold `name` (e.g. an optional projection).
    pub fn contains(&self, name: &str) -> bool {
        self.rec.tensors.contains_key(name)
    }

    /// The tensors the model took: sorted trainable vars and the parameter count.
    pub fn finish(self) -> Params {
        let used = self
            .rec
            .used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let count = used
            .iter()
            .filter_map(|n| self.rec.tensors.get(n))
            .filter(|t| t.dtype().is_float())
            .map(|t| t.elem_count())
            .sum();
        let vars = match self.vars {
            None => Vec::new(),
            Some(mut all) => used
                .iter()
                .filter_map(|n| all.remove(n).map(|v| (n.clone(), v)))
                .collect(),
        };
        Params { vars, count }
    }
}

impl Params {
    /// Trainable tensors sorted by name (empty for a frozen model).
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.vars.clone()
    }

    pub fn trainable_names(&self) -> Vec<String> {
        self.vars.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Number of scalar parameters the model uses.
    pub fn param_count(&self) -> usize {
        self.count
    }

    pub fn is_trainable(&self) -> bool {
        !self.vars.is_empty()
    }
}
