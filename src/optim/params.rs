//! [`Params`]: the ordered, named list of trainable [`Var`]s every model hands to the optimizer.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};

use crate::tensor::ops::is_float;

/// An ordered list of named trainable variables. Cheap to clone (the list is shared; a
/// [`Var`] is itself a handle), so the same variables are seen by the model that computes
/// with them and by the optimizer that updates them in place.
#[derive(Clone, Default)]
pub struct Params {
    vars: Arc<Vec<(String, Var)>>,
}

impl std::fmt::Debug for Params {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Params({} tensors, {} elements)",
            self.len(),
            self.numel()
        )
    }
}

impl Params {
    /// Wrap the variables a model exposes (`trainable_vars()`); names must be unique and
    /// every variable a float tensor.
    pub fn from_vars(vars: Vec<(String, Var)>) -> Result<Self> {
        let mut seen = HashSet::new();
        for (name, var) in &vars {
            if !seen.insert(name.as_str()) {
                bail!("params: duplicate name `{name}`");
            }
            if !is_float(var.dtype()) {
                bail!(
                    "params: `{name}` has dtype {} but trainable tensors must be floats",
                    var.dtype().as_str()
                );
            }
        }
        Ok(Self {
            vars: Arc::new(vars),
        })
    }

    /// Every variable of a candle_nn `VarMap` (e.g. the one behind `VarBuilder::from_varmap`),
    /// sorted by name.
    pub fn from_varmap(varmap: &candle_nn::VarMap) -> Result<Self> {
        let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        let mut vars: Vec<(String, Var)> =
            data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Self::from_vars(vars)
    }

    /// Fresh variables initialized with copies of `tensors` (toy problems, tests).
    pub fn from_tensors(tensors: Vec<(String, Tensor)>) -> Result<Self> {
        let vars = tensors
            .into_iter()
            .map(|(name, t)| {
                let var = Var::from_tensor(&t.detach().copy()?)
                    .with_context(|| format!("params: cannot make `{name}` a variable"))?;
                Ok((name, var))
            })
            .collect::<Result<Vec<_>>>()?;
        Self::from_vars(vars)
    }

    /// One list from several (e.g. the LRM's projections and its UNet); names must stay unique.
    pub fn merge(parts: &[Params]) -> Result<Self> {
        Self::from_vars(
            parts
                .iter()
                .flat_map(|p| p.vars().iter().cloned())
                .collect(),
        )
    }

    /// The variables whose names start with `prefix`, in order (the same variables, not copies).
    pub fn select(&self, prefix: &str) -> Self {
        Self {
            vars: Arc::new(
                self.vars
                    .iter()
                    .filter(|(n, _)| n.starts_with(prefix))
                    .cloned()
                    .collect(),
            ),
        }
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    pub fn len(&self) -> usize {
        self.vars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    pub fn names(&self) -> Vec<String> {
        self.vars.iter().map(|(n, _)| n.clone()).collect()
    }

    pub fn get(&self, name: &str) -> Option<&Var> {
        self.vars.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// Total number of elements over every variable.
    pub fn numel(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Detached deep copies of the current values (later updates do not change them).
    pub fn to_map(&self) -> Result<Vec<(String, Tensor)>> {
        self.vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().detach().copy()?)))
            .collect()
    }

    /// Set every variable in place from `values` (converted to the variable's dtype and
    /// device). Every name must be present with the right shape; extra keys are ignored.
    /// Nothing is changed unless every entry checks out.
    pub fn load_map(&self, values: &HashMap<String, Tensor>) -> Result<()> {
        let mut staged = Vec::with_capacity(self.vars.len());
        for (name, var) in self.vars.iter() {
            let Some(t) = values.get(name) else {
                let mut have: Vec<&str> = values.keys().map(String::as_str).collect();
                have.sort();
                bail!(
                    "load_map: missing key `{name}` (the map has: {})",
                    have.join(", ")
                );
            };
            if t.dims() != var.dims() {
                bail!(
                    "load_map: `{name}` has shape {:?} but the parameter has shape {:?}",
                    t.dims(),
                    var.dims()
                );
            }
            let t = t
                .to_dtype(var.dtype())?
                .to_device(var.device())?
                .contiguous()?;
            staged.push((var, t));
        }
        for (var, t) in staged {
            // A copy: the variable must never share storage with the caller's tensor.
            var.set(&t.copy()?)?;
        }
        Ok(())
    }
}
