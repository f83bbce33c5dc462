//! LoRA on a mixture's experts in the layout PEFT 0.21 reads with
//! transformers 5.
//!
//! transformers 5 holds a layer's experts in fused 3-D parameters
//! (`mlp.experts.gate_up_proj` `[experts, 2·inner, hidden]`,
//! `mlp.experts.down_proj`); the model plugin says which expert layer
//! lives where ([`FusedSlot`]). PEFT adapts such a parameter with
//! `target_parameters`: one LoRA pair for all its experts, `lora_A`
//! `[experts·R, in]` (expert `e`'s rows `e·R .. (e+1)·R`) and `lora_B`
//! `[rows, R·experts]` (expert `e`'s rank `k` in column `k·experts + e`),
//! saved under the module's name with one `.base_layer` per parameter of
//! the same module targeted after it.
//!
//! oxtune trains one LoRA per expert layer. Saving stacks them
//! block-diagonally: gate and up keep their own `A` and rank (`R = 2r` for
//! `gate_up_proj`, with `rank_pattern` / `alpha_pattern` keeping the scale
//! `α/r`), which is exactly what PEFT itself makes of per-expert adapters.
//! Loading splits a fused pair back into per-expert layers: a block-diagonal
//! one into its blocks, one whose gate and up share `A` (PEFT's own
//! training) into full-rank copies, any difference in scale folded into `B`.
//! Dense MLP layers of the same model are saved as `target_parameters` too
//! (`….mlp.gate_proj.weight`), since PEFT would move a `gate_proj` module
//! target onto the experts. PEFT refuses dropout (and DoRA) on fused
//! parameters; so does oxtune, when the adapter is created.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};
use oxtune_plugin_api::LinearLayer;
use serde_json::Value;

/// The expert layers of one fused parameter, as the model declares them.
struct FusedParameter<'a> {
    /// Its full name (`model.layers.0.mlp.experts.gate_up_proj`).
    name: &'a str,
    /// Experts in it.
    experts: usize,
    /// `(expert, first row, layer)` of every expert layer it holds.
    layers: Vec<(usize, usize, &'a str)>,
}

impl FusedParameter<'_> {
    /// The module holding the parameter, and the parameter's own name.
    fn module_and_name(&self) -> (&str, &str) {
        self.name.rsplit_once('.').unwrap_or(("", self.name))
    }

    /// The distinct first rows of its components (gate 0, up `inner`), in order.
    fn components(&self) -> Vec<usize> {
        let mut offsets: Vec<usize> = self.layers.iter().map(|&(_, offset, _)| offset).collect();
        offsets.sort_unstable();
        offsets.dedup();
        offsets
    }

    fn layer(&self, expert: usize, offset: usize) -> Option<&str> {
        self.layers.iter().find(|&&(e, o, _)| e == expert && o == offset).map(|&(_, _, l)| l)
    }
}

/// The fused parameters of a model's declared layers, in declaration order.
fn fused_parameters(declared: &[LinearLayer]) -> Vec<FusedParameter<'_>> {
    let mut out: Vec<FusedParameter<'_>> = Vec::new();
    for layer in declared {
        let Some(slot) = &layer.fused else { continue };
        let entry = match out.iter_mut().position(|p| p.name == slot.parameter) {
            Some(i) => &mut out[i],
            None => {
                out.push(FusedParameter { name: &slot.parameter, experts: slot.experts, layers: Vec::new() });
                out.last_mut().expect("just pushed")
            }
        };
        entry.layers.push((slot.expert, slot.row_offset, &layer.name));
    }
    out
}

/// Whether transformers holds `layer` in a fused parameter.
pub fn is_fused(declared: Option<&[LinearLayer]>, layer: &str) -> bool {
    declared.is_some_and(|layers| layers.iter().any(|l| l.name == layer && l.fused.is_some()))
}

/// Refuses an adapter config PEFT could not load on fused expert
/// parameters, when it adapts `expert_layer`: dropout and DoRA.
pub fn check_config(config: &Value, expert_layer: &str) -> Result<(), String> {
    if config.get("use_dora").and_then(Value::as_bool).unwrap_or(false) {
        return Err(format!(
            "`{expert_layer}` is an expert, which transformers 5 holds in a fused parameter: PEFT has no DoRA for \
             those (use LoRA, or leave the experts out of the target modules)"
        ));
    }
    let dropout = config.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
    if dropout > 0.0 {
        return Err(format!(
            "`{expert_layer}` is an expert, which transformers 5 holds in a fused parameter, and PEFT refuses \
             lora_dropout {dropout} there (its ParamWrapper cannot drop the input): pass --lora-dropout 0"
        ));
    }
    Ok(())
}

/// The scale PEFT gives a LoRA pair of rank `rank` with `alpha`.
fn scale(alpha: f64, rank: usize, rslora: bool) -> f64 {
    if rslora {
        alpha / (rank as f64).sqrt()
    } else {
        alpha / rank as f64
    }
}

/// The key of the `A` / `B` (`which`) matrix of the `index`-th of `count`
/// targeted parameters of `module` (each later one wraps the earlier).
fn fused_key(prefix: &str, module: &str, index: usize, count: usize, which: char) -> String {
    format!("{prefix}{module}{}.lora_{which}.weight", ".base_layer".repeat(count - 1 - index))
}

fn matrix(t: &Tensor) -> candle_core::Result<(Vec<f32>, usize, usize)> {
    let (rows, cols) = t.dims2()?;
    Ok((t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?, rows, cols))
}

fn tensor(values: Vec<f32>, rows: usize, cols: usize, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    Tensor::from_vec(values, (rows, cols), device)?.to_dtype(dtype)
}

/// The PEFT config's settings the scales depend on: `(r, lora_alpha, use_rslora)`.
fn lora_settings(config: &Value) -> (usize, f64, bool) {
    let r = config.get("r").and_then(Value::as_u64).unwrap_or(8) as usize;
    let alpha = config.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0);
    (r.max(1), alpha, config.get("use_rslora").and_then(Value::as_bool).unwrap_or(false))
}

/// Rewrites a per-expert LoRA adapter (`tensors` keyed `{prefix}{layer}.lora_{A,B}.weight`,
/// `config` its PEFT config) into PEFT's fused form; `out_features` gives
/// a layer's output rows (a fused pair spans every component's rows, also
/// those of components left unadapted). Nothing changes when no expert
/// layer is adapted.
pub fn fuse(
    config: &mut Value,
    tensors: &mut HashMap<String, Tensor>,
    declared: &[LinearLayer],
    out_features: impl Fn(&str) -> Option<usize>,
    prefix: &str,
) -> Result<(), String> {
    let parameters = fused_parameters(declared);
    let key = |layer: &str, which: char| format!("{prefix}{layer}.lora_{which}.weight");
    let adapted: Vec<&FusedParameter<'_>> = parameters
        .iter()
        .filter(|p| p.layers.iter().any(|&(_, _, layer)| tensors.contains_key(&key(layer, 'A'))))
        .collect();
    if adapted.is_empty() {
        return Ok(());
    }
    if let Some((_, _, layer)) = adapted[0].layers.first() {
        check_config(config, layer)?;
    }
    let (r, alpha, rslora) = lora_settings(config);
    let mut fused_ranks: BTreeMap<String, usize> = BTreeMap::new();
    let mut targets: Vec<Value> = match config.get("target_parameters") {
        Some(Value::Array(list)) => list.clone(),
        _ => Vec::new(),
    };
    for (i, parameter) in adapted.iter().enumerate() {
        let components = parameter.components();
        let experts = parameter.experts;
        // Each component's rank and input width, from any expert that adapts
        // it (0 rank for one left unadapted), and its rows from the model.
        let mut shape = Vec::with_capacity(components.len());
        for &offset in &components {
            let rows = parameter
                .layer(0, offset)
                .and_then(&out_features)
                .ok_or_else(|| format!("`{}` has no expert 0 at row {offset} in the model", parameter.name))?;
            let mut found: Option<(usize, usize)> = None;
            for e in 0..experts {
                let Some(layer) = parameter.layer(e, offset) else { continue };
                let Some(a) = tensors.get(&key(layer, 'A')) else { continue };
                let seen = a.dims2().map_err(|e| e.to_string())?;
                if found.is_some_and(|f| f != seen) {
                    return Err(format!(
                        "the experts of `{}` have LoRA ranks or widths that differ ({found:?} vs {seen:?} at \
                         `{layer}`): PEFT's fused layout needs one rank",
                        parameter.name
                    ));
                }
                found = Some(seen);
            }
            let (rank, width) = found.unwrap_or((0, 0));
            shape.push((rank, rows, width));
        }
        let total_rank: usize = shape.iter().map(|s| s.0).sum();
        let width = shape.iter().map(|s| s.2).max().unwrap_or(0);
        let total_rows = components.iter().zip(&shape).map(|(&offset, s)| offset + s.1).max().unwrap_or(0);
        let (mut a_fused, mut b_fused) =
            (vec![0f32; experts * total_rank * width], vec![0f32; total_rows * total_rank * experts]);
        let (mut dtype, mut device) = (DType::F32, Device::Cpu);
        let mut rank_start = 0;
        for (&offset, &(rank, rows, _)) in components.iter().zip(&shape) {
            for e in 0..experts {
                let Some(layer) = parameter.layer(e, offset) else { continue };
                let (Some(a), Some(b)) = (tensors.remove(&key(layer, 'A')), tensors.remove(&key(layer, 'B'))) else {
                    continue;
                };
                (dtype, device) = (a.dtype(), a.device().clone());
                let (a, _, _) = matrix(&a).map_err(|e| e.to_string())?;
                let (b, b_rows, _) = matrix(&b).map_err(|e| e.to_string())?;
                if b_rows != rows {
                    return Err(format!("`{layer}`'s LoRA B has {b_rows} rows, the layer {rows}"));
                }
                for k in 0..rank {
                    let row = e * total_rank + rank_start + k;
                    a_fused[row * width..(row + 1) * width].copy_from_slice(&a[k * width..(k + 1) * width]);
                    let column = (rank_start + k) * experts + e;
                    for j in 0..rows {
                        b_fused[(offset + j) * total_rank * experts + column] = b[j * rank + k];
                    }
                }
            }
            rank_start += rank;
        }
        let a = tensor(a_fused, experts * total_rank, width, dtype, &device).map_err(|e| e.to_string())?;
        let b = tensor(b_fused, total_rows, total_rank * experts, dtype, &device).map_err(|e| e.to_string())?;
        let (module, name) = parameter.module_and_name();
        if fused_ranks.insert(name.to_owned(), total_rank).is_some_and(|seen| seen != total_rank) {
            return Err(format!("`{name}` parameters get different fused ranks: PEFT's rank_pattern holds one"));
        }
        // Each later parameter of a module wraps the earlier ones.
        let same_module = |p: &&&FusedParameter<'_>| p.module_and_name().0 == module;
        let (index, count) =
            (adapted[..i].iter().filter(same_module).count(), adapted.iter().filter(same_module).count());
        tensors.insert(fused_key(prefix, module, index, count, 'A'), a);
        tensors.insert(fused_key(prefix, module, index, count, 'B'), b);
        // PEFT names them as it does: by the parameter's own name.
        let short = Value::String(name.to_owned());
        if !targets.contains(&short) {
            targets.push(short);
        }
    }
    // Module targets naming expert layers leave: PEFT would move them onto
    // the experts itself, dropping any dense layer they also name, which
    // is kept as a parameter target instead.
    let expert_layers: Vec<&str> = parameters.iter().flat_map(|p| p.layers.iter().map(|&(_, _, l)| l)).collect();
    let names_expert = |t: &str| expert_layers.iter().any(|l| *l == t || l.ends_with(&format!(".{t}")));
    if let Some(Value::Array(modules)) = config.get_mut("target_modules") {
        let removed: Vec<String> =
            modules.iter().filter_map(Value::as_str).filter(|t| names_expert(t)).map(str::to_owned).collect();
        modules.retain(|t| !t.as_str().is_some_and(names_expert));
        let mut dense: Vec<String> = tensors
            .keys()
            .filter_map(|k| k.strip_prefix(prefix)?.strip_suffix(".lora_A.weight"))
            .filter(|layer| removed.iter().any(|t| *layer == t || layer.ends_with(&format!(".{t}"))))
            .map(|layer| format!("{layer}.weight"))
            .collect();
        dense.sort();
        targets.extend(dense.into_iter().map(Value::String));
    }
    config["target_parameters"] = Value::Array(targets);
    for (name, rank) in fused_ranks.into_iter().filter(|&(_, rank)| rank != r) {
        let pattern = format!(".*\\.{name}");
        let fused_alpha = if rslora { alpha * (rank as f64 / r as f64).sqrt() } else { alpha * rank as f64 / r as f64 };
        for (key, value) in [("rank_pattern", Value::from(rank)), ("alpha_pattern", Value::from(fused_alpha))] {
            if !config.get(key).is_some_and(Value::is_object) {
                config[key] = Value::Object(Default::default());
            }
            config[key][&pattern] = value;
        }
    }
    Ok(())
}

/// A PEFT pattern (`rank_pattern`, `alpha_pattern`) key matching `name`, as
/// PEFT matches them: the key as a regex on the whole name or a dotted tail of it.
fn pattern_value(config: &Value, pattern: &str, name: &str) -> Option<(String, f64)> {
    let map = config.get(pattern)?.as_object()?;
    map.iter().find_map(|(key, value)| {
        let re = regex::Regex::new(&format!("^(?:.*\\.)?(?:{key})$")).ok()?;
        if re.is_match(name) {
            value.as_f64().map(|v| (key.clone(), v))
        } else {
            None
        }
    })
}

/// Adds layer names to a config's `target_modules` (a list, or a regex).
fn add_targets(config: &mut Value, layers: &[String]) {
    match config.get_mut("target_modules") {
        Some(Value::Array(list)) => list.extend(layers.iter().cloned().map(Value::String)),
        Some(Value::String(regex)) => {
            let exact: Vec<String> = layers.iter().map(|l| regex::escape(l)).collect();
            *regex = format!("(?:{regex})|(?:{})", exact.join("|"));
        }
        _ => config["target_modules"] = Value::Array(layers.iter().cloned().map(Value::String).collect()),
    }
}

/// Splits the fused LoRA pairs of a PEFT adapter (`tensors` without PEFT's
/// prefix, `config` its PEFT config) into per-expert layers, and turns its
/// `target_parameters` into module targets; nothing changes without
/// `target_parameters`.
pub fn unfuse(
    config: &mut Value,
    tensors: Vec<(String, Tensor)>,
    declared: Option<&[LinearLayer]>,
) -> Result<Vec<(String, Tensor)>, String> {
    let targets: Vec<String> = match config.get("target_parameters") {
        Some(Value::Array(list)) if !list.is_empty() => list
            .iter()
            .map(|t| t.as_str().map(str::to_owned).ok_or("`target_parameters` must be names"))
            .collect::<Result<_, _>>()?,
        _ => return Ok(tensors),
    };
    let declared = declared.unwrap_or(&[]);
    let parameters = fused_parameters(declared);
    let mut tensors: HashMap<String, Tensor> = tensors.into_iter().collect();
    let (r, alpha, rslora) = lora_settings(config);
    let global_scale = scale(alpha, r, rslora);
    // Each target: a fused parameter (suffix match), or a dense layer's weight.
    let mut chosen: Vec<&FusedParameter<'_>> = Vec::new();
    let mut dense: Vec<String> = Vec::new();
    for target in &targets {
        let matched: Vec<&FusedParameter<'_>> =
            parameters.iter().filter(|p| p.name == target || p.name.ends_with(&format!(".{target}"))).collect();
        if !matched.is_empty() {
            for parameter in matched {
                if !chosen.iter().any(|c| c.name == parameter.name) {
                    chosen.push(parameter);
                }
            }
        } else if let Some(layer) = target.strip_suffix(".weight") {
            dense.push(layer.to_owned());
        } else {
            return Err(format!("`target_parameters` names `{target}`, which is no fused parameter of this model"));
        }
    }
    // PEFT wraps a module's targeted parameters in the order the module
    // registers them (the config's list is unordered): the model's order.
    chosen.sort_by_key(|c| parameters.iter().position(|p| p.name == c.name));
    let mut per_module: BTreeMap<&str, Vec<&FusedParameter<'_>>> = BTreeMap::new();
    for parameter in &chosen {
        per_module.entry(parameter.module_and_name().0).or_default().push(parameter);
    }
    let mut out_layers: Vec<String> = Vec::new();
    for (module, list) in &per_module {
        for (index, parameter) in list.iter().enumerate() {
            let (a_key, b_key) =
                (fused_key("", module, index, list.len(), 'A'), fused_key("", module, index, list.len(), 'B'));
            let (Some(a), Some(b)) = (tensors.remove(&a_key), tensors.remove(&b_key)) else {
                return Err(format!("the adapter targets `{}` but has no `{a_key}` and `{b_key}`", parameter.name));
            };
            let (dtype, device) = (a.dtype(), a.device().clone());
            let experts = parameter.experts;
            let (a, a_rows, width) = matrix(&a).map_err(|e| e.to_string())?;
            let (b, rows, b_cols) = matrix(&b).map_err(|e| e.to_string())?;
            if a_rows % experts != 0 || b_cols != a_rows {
                return Err(format!(
                    "`{a_key}` [{a_rows}, {width}] and `{b_key}` [{rows}, {b_cols}] are not a LoRA pair over {experts} experts"
                ));
            }
            let rank = a_rows / experts;
            let fused_alpha = pattern_value(config, "alpha_pattern", parameter.name).map_or(alpha, |(_, v)| v);
            let fold = (scale(fused_alpha, rank, rslora) / global_scale) as f32;
            let components = parameter.components();
            let n = components.len();
            let bounds: Vec<(usize, usize)> = components
                .iter()
                .enumerate()
                .map(|(c, &offset)| (offset, components.get(c + 1).copied().unwrap_or(rows)))
                .collect();
            let entry = |e: usize, k: usize, row: usize| b[row * rank * experts + k * experts + e];
            // Block-diagonal (oxtune's own saves): component c owns ranks c·rank/n .. (c+1)·rank/n.
            let block = n > 1 && rank % n == 0 && {
                let per = rank / n;
                (0..experts).all(|e| {
                    bounds.iter().enumerate().all(|(c, &(start, end))| {
                        (start..end).all(|row| (0..rank).all(|k| k / per == c || entry(e, k, row) == 0.0))
                    })
                })
            };
            for e in 0..experts {
                for (c, &(start, end)) in bounds.iter().enumerate() {
                    let Some(layer) = parameter.layer(e, start) else { continue };
                    let ranks: Vec<usize> =
                        if block { (c * rank / n..(c + 1) * rank / n).collect() } else { (0..rank).collect() };
                    let mut a_out = Vec::with_capacity(ranks.len() * width);
                    for &k in &ranks {
                        let row = e * rank + k;
                        a_out.extend_from_slice(&a[row * width..(row + 1) * width]);
                    }
                    let mut b_out = Vec::with_capacity((end - start) * ranks.len());
                    for row in start..end {
                        b_out.extend(ranks.iter().map(|&k| entry(e, k, row) * fold));
                    }
                    let a_t = tensor(a_out, ranks.len(), width, dtype, &device).map_err(|e| e.to_string())?;
                    let b_t = tensor(b_out, end - start, ranks.len(), dtype, &device).map_err(|e| e.to_string())?;
                    tensors.insert(format!("{layer}.lora_A.weight"), a_t);
                    tensors.insert(format!("{layer}.lora_B.weight"), b_t);
                    out_layers.push(layer.to_owned());
                }
            }
        }
    }
    // The fused parameters' own ranks and alphas are folded in above.
    for parameter in &chosen {
        for pattern in ["rank_pattern", "alpha_pattern"] {
            if let Some((key, _)) = pattern_value(config, pattern, parameter.name) {
                config[pattern].as_object_mut().expect("matched in an object").remove(&key);
            }
        }
    }
    out_layers.extend(dense);
    add_targets(config, &out_layers);
    config["target_parameters"] = Value::Null;
    let mut out: Vec<(String, Tensor)> = tensors.into_iter().collect();
    out.sort_by(|x, y| x.0.cmp(&y.0));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use oxtune_plugin_api::{FusedSlot, LinearRole};

    /// Two experts of inner width 2 and hidden 3: gate/up in `gate_up_proj`, down alone.
    fn declared() -> Vec<LinearLayer> {
        let mut layers = Vec::new();
        for e in 0..2 {
            for (proj, fused, offset) in
                [("gate_proj", "gate_up_proj", 0), ("up_proj", "gate_up_proj", 2), ("down_proj", "down_proj", 0)]
            {
                let slot =
                    FusedSlot { parameter: format!("m.experts.{fused}"), expert: e, experts: 2, row_offset: offset };
                layers.push(LinearLayer::new(format!("m.experts.{e}.{proj}"), LinearRole::MlpGate).in_fused(slot));
            }
        }
        layers.push(LinearLayer::new("m.attn.q_proj", LinearRole::AttentionQ));
        layers
    }

    fn random(rows: usize, cols: usize, seed: u64) -> Tensor {
        let mut rng = crate::rng::SplitMix64::new(seed);
        Tensor::from_vec((0..rows * cols).map(|_| rng.normal() as f32).collect::<Vec<_>>(), (rows, cols), &Device::Cpu)
            .unwrap()
    }

    fn delta(a: &Tensor, b: &Tensor) -> Tensor {
        b.matmul(a).unwrap()
    }

    #[test]
    fn fused_pairs_hold_each_expert_s_update_and_split_back_exactly() {
        let declared = declared();
        let mut tensors = HashMap::new();
        let mut seed = 0;
        for e in 0..2 {
            for (proj, rows, width) in [("gate_proj", 2, 3), ("up_proj", 2, 3), ("down_proj", 3, 2)] {
                seed += 1;
                tensors.insert(format!("p.m.experts.{e}.{proj}.lora_A.weight"), random(2, width, seed));
                tensors.insert(format!("p.m.experts.{e}.{proj}.lora_B.weight"), random(rows, 2, seed + 100));
            }
        }
        tensors.insert("p.m.attn.q_proj.lora_A.weight".into(), random(2, 3, 50));
        tensors.insert("p.m.attn.q_proj.lora_B.weight".into(), random(3, 2, 51));
        let original = tensors.clone();
        let mut config = serde_json::json!({"r": 2, "lora_alpha": 4.0, "lora_dropout": 0.0,
            "target_modules": ["q_proj", "gate_proj", "up_proj", "down_proj"]});
        fuse(&mut config, &mut tensors, &declared, out_features, "p.").unwrap();
        let mut keys: Vec<&String> = tensors.keys().collect();
        keys.sort();
        assert_eq!(
            keys,
            vec![
                "p.m.attn.q_proj.lora_A.weight",
                "p.m.attn.q_proj.lora_B.weight",
                "p.m.experts.base_layer.lora_A.weight",
                "p.m.experts.base_layer.lora_B.weight",
                "p.m.experts.lora_A.weight",
                "p.m.experts.lora_B.weight"
            ]
        );
        assert_eq!(config["target_modules"], serde_json::json!(["q_proj"]));
        assert_eq!(config["target_parameters"], serde_json::json!(["gate_up_proj", "down_proj"]));
        assert_eq!(
            (
                config["rank_pattern"][".*\\.gate_up_proj"].as_u64(),
                config["alpha_pattern"][".*\\.gate_up_proj"].as_f64()
            ),
            (Some(4), Some(8.0))
        );
        // PEFT's delta of expert e: B[:, k·E + e] · A[e·R + k].
        let a = &tensors["p.m.experts.base_layer.lora_A.weight"];
        let b = &tensors["p.m.experts.base_layer.lora_B.weight"];
        assert_eq!((a.dims(), b.dims()), (&[8, 3][..], &[4, 8][..]));
        for e in 0..2usize {
            let a_e = a.narrow(0, e * 4, 4).unwrap();
            let columns = Tensor::new((0..4u32).map(|k| k * 2 + e as u32).collect::<Vec<_>>(), &Device::Cpu).unwrap();
            let b_e = b.index_select(&columns, 1).unwrap();
            let fused = delta(&a_e, &b_e);
            for (proj, start) in [("gate_proj", 0), ("up_proj", 2)] {
                let want = delta(
                    &original[&format!("p.m.experts.{e}.{proj}.lora_A.weight")],
                    &original[&format!("p.m.experts.{e}.{proj}.lora_B.weight")],
                );
                let got = fused.narrow(0, start, 2).unwrap();
                let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(diff < 1e-6, "expert {e} {proj}: {diff}");
            }
        }
        // And back: the same per-expert pairs, the config as it was.
        let stripped: Vec<(String, Tensor)> =
            tensors.into_iter().map(|(k, v)| (k.strip_prefix("p.").unwrap().to_owned(), v)).collect();
        let back = unfuse(&mut config, stripped, Some(&declared)).unwrap();
        assert_eq!(back.len(), original.len());
        for (name, t) in back {
            let diff = (t - &original[&format!("p.{name}")])
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(diff, 0.0, "{name}");
        }
        assert!(config["target_parameters"].is_null());
        assert_eq!(config["rank_pattern"], serde_json::json!({}));
    }

    /// The rows of the test model's layers: gate and up 2, down 3.
    fn out_features(layer: &str) -> Option<usize> {
        Some(if layer.ends_with("down_proj") { 3 } else { 2 })
    }

    #[test]
    fn a_fused_pair_spans_every_component_when_only_some_are_adapted() {
        // Only the gate of each expert: gate_up_proj's B still has the up rows (as zeros).
        let mut tensors = HashMap::new();
        for e in 0..2 {
            tensors.insert(format!("p.m.experts.{e}.gate_proj.lora_A.weight"), random(2, 3, e as u64));
            tensors.insert(format!("p.m.experts.{e}.gate_proj.lora_B.weight"), random(2, 2, 10 + e as u64));
        }
        let mut config = serde_json::json!({"r": 2, "lora_alpha": 4.0, "target_modules": ["gate_proj"]});
        fuse(&mut config, &mut tensors, &declared(), out_features, "p.").unwrap();
        let b = &tensors["p.m.experts.lora_B.weight"];
        assert_eq!(b.dims(), &[4, 4], "2 gate + 2 up rows, rank 2 for 2 experts");
        let up_rows = b.narrow(0, 2, 2).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(up_rows, 0.0);
        assert_eq!(config["target_parameters"], serde_json::json!(["gate_up_proj"]));
        assert!(config.get("rank_pattern").is_none(), "the fused rank is r: no pattern");
    }

    #[test]
    fn dropout_and_dora_on_experts_are_refused_as_peft_refuses_them() {
        let err = check_config(&serde_json::json!({"lora_dropout": 0.05}), "m.experts.0.gate_proj").unwrap_err();
        assert!(err.contains("--lora-dropout 0") && err.contains("m.experts.0.gate_proj"), "{err}");
        let err = check_config(&serde_json::json!({"use_dora": true}), "m.experts.0.gate_proj").unwrap_err();
        assert!(err.contains("DoRA"), "{err}");
        assert!(check_config(&serde_json::json!({"lora_dropout": 0.0}), "x").is_ok());
    }
}
