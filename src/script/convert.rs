//! Script values <-> tensors: nested arrays, shapes and scalars.

use candle_core::{DType, Device, Tensor};
use rhai::{Array, Dynamic};

use crate::tensor::ops::to_f64_vec;

/// An int or a float as f64 (scripts may write either where a number is expected).
pub fn dynamic_f64(v: &Dynamic) -> Option<f64> {
    v.as_float()
        .ok()
        .or_else(|| v.as_int().ok().map(|i| i as f64))
}

/// A shape given as an array of non-negative ints.
pub fn shape_from_array(shape: &Array) -> Result<Vec<usize>, String> {
    shape
        .iter()
        .map(|d| match d.as_int() {
            Ok(n) if n >= 0 => Ok(n as usize),
            Ok(n) => Err(format!(
                "shape {}: dimension {n} is negative",
                show_array(shape)
            )),
            Err(t) => Err(format!(
                "shape {}: dimension of type {t} is not an int",
                show_array(shape)
            )),
        })
        .collect()
}

pub fn shape_to_array(dims: &[usize]) -> Array {
    dims.iter().map(|&d| Dynamic::from(d as i64)).collect()
}

fn show_array(a: &Array) -> String {
    format!(
        "[{}]",
        a.iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// A (possibly nested) array of numbers as a tensor: all ints give i64, any float gives f32.
pub fn tensor_from_dynamic(value: &Dynamic, device: &Device) -> Result<Tensor, String> {
    if let Some(t) = value.clone().try_cast::<Tensor>() {
        return Ok(t);
    }
    let mut dims = Vec::new();
    let mut values = Vec::new();
    let mut all_int = true;
    flatten(value, 0, &mut dims, &mut values, &mut all_int)?;
    let result = if all_int {
        Tensor::from_vec(
            values.iter().map(|&v| v as i64).collect::<Vec<_>>(),
            dims,
            device,
        )
    } else {
        Tensor::from_vec(
            values.iter().map(|&v| v as f32).collect::<Vec<_>>(),
            dims,
            device,
        )
    };
    result.map_err(|e| e.to_string())
}

fn flatten(
    value: &Dynamic,
    depth: usize,
    dims: &mut Vec<usize>,
    out: &mut Vec<f64>,
    all_int: &mut bool,
) -> Result<(), String> {
    if value.is_array() {
        let arr = value.read_lock::<Array>().expect("checked is_array");
        if dims.len() == depth {
            dims.push(arr.len());
        } else if dims[depth] != arr.len() {
            return Err(format!(
                "tensor: ragged nested array: length {} at depth {depth} where {} was expected",
                arr.len(),
                dims[depth]
            ));
        }
        for item in arr.iter() {
            flatten(item, depth + 1, dims, out, all_int)?;
        }
        return Ok(());
    }
    if depth < dims.len() {
        return Err(format!(
            "tensor: ragged nested array: a number at depth {depth} where an array was expected"
        ));
    }
    if let Ok(i) = value.as_int() {
        out.push(i as f64);
    } else if let Ok(f) = value.as_float() {
        *all_int = false;
        out.push(f);
    } else if let Ok(b) = value.as_bool() {
        out.push(if b { 1.0 } else { 0.0 });
    } else {
        return Err(format!(
            "tensor: element of type {} is not a number",
            value.type_name()
        ));
    }
    Ok(())
}

fn is_integral(dtype: DType) -> bool {
    matches!(dtype, DType::I64 | DType::U32 | DType::U8)
}

fn scalar_dynamic(v: f64, integral: bool) -> Dynamic {
    if integral {
        Dynamic::from(v as i64)
    } else {
        Dynamic::from(v)
    }
}

/// Nested arrays of ints (integer dtypes) or floats.
pub fn tensor_to_dynamic(t: &Tensor) -> Result<Dynamic, String> {
    let values = to_f64_vec(t).map_err(|e| e.to_string())?;
    let integral = is_integral(t.dtype());
    if t.rank() == 0 {
        return Ok(scalar_dynamic(values[0], integral));
    }
    fn build(values: &[f64], dims: &[usize], integral: bool) -> Dynamic {
        if dims.len() == 1 {
            return Dynamic::from_array(
                values
                    .iter()
                    .map(|&v| scalar_dynamic(v, integral))
                    .collect(),
            );
        }
        let stride: usize = dims[1..].iter().product();
        Dynamic::from_array(
            (0..dims[0])
                .map(|i| build(&values[i * stride..(i + 1) * stride], &dims[1..], integral))
                .collect(),
        )
    }
    Ok(build(&values, t.dims(), integral))
}

/// The single value of a one-element tensor.
pub fn tensor_item(t: &Tensor) -> Result<Dynamic, String> {
    if t.elem_count() != 1 {
        return Err(format!(
            "item: tensor has {} elements (shape {:?}); item() needs exactly one",
            t.elem_count(),
            t.dims()
        ));
    }
    let v = to_f64_vec(t).map_err(|e| e.to_string())?[0];
    Ok(scalar_dynamic(v, is_integral(t.dtype())))
}

/// A script map of tensors as name -> tensor (a checkpoint's or a state's tensors). With
/// `scalars`, ints and floats become 0-d i64 / f64 tensors (an optimizer state's step counts).
/// Errors name the function and the entry.
pub fn tensors_from_map(
    map: &rhai::Map,
    func: &str,
    scalars: bool,
) -> Result<std::collections::HashMap<String, Tensor>, String> {
    map.iter()
        .map(|(k, v)| {
            let t = if let Some(t) = v.clone().try_cast::<Tensor>() {
                t
            } else if scalars && v.is_int() {
                Tensor::new(v.as_int().unwrap_or_default(), &Device::Cpu)
                    .map_err(|e| e.to_string())?
            } else if scalars && v.is_float() {
                Tensor::new(v.as_float().unwrap_or_default(), &Device::Cpu)
                    .map_err(|e| e.to_string())?
            } else {
                return Err(format!(
                    "{func}: entry `{k}` is a {}, not a tensor",
                    v.type_name()
                ));
            };
            Ok((k.to_string(), t))
        })
        .collect()
}

/// Named tensors as a script map.
pub fn tensors_to_map(tensors: impl IntoIterator<Item = (String, Tensor)>) -> rhai::Map {
    tensors
        .into_iter()
        .map(|(k, t)| (k.into(), Dynamic::from(t)))
        .collect()
}
