//! Bad input gets a clear error naming the file, tensor or field and what was expected; never a
//! panic. One test per case.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod tiny_text;

use hawada::families::{
    self,
    resnet::{Resnet, ResnetConfig},
};
use hawada::gates::{GateOptions, Gates};
use hawada::model::{Family, KeepSet};
use hawada::recipe::{Recipe, DEFAULT_RECIPE};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};
use tiny_text::{tiny_text, TinyText};

fn saved_tiny(dir: &Path) -> Resnet {
    let model = Resnet::new(ResnetConfig::tiny(), Device::Cpu, Path::new("test")).unwrap();
    model.save(dir).unwrap();
    model
}

fn load_err(dir: &Path) -> String {
    families::load(dir, Device::Cpu, Kind::Float, false)
        .err()
        .unwrap()
        .to_string()
}

fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) {
    let file = dir.join("model.safetensors");
    let mut tensors = hawada::io::safetensors::read(&file).unwrap();
    edit(&mut tensors);
    hawada::io::safetensors::write(&file, &tensors).unwrap();
}

#[test]
fn missing_weights_file_names_it() {
    let dir = tempfile::tempdir().unwrap();
    saved_tiny(dir.path());
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("No such file"),
        "{err}"
    );
}

#[test]
fn truncated_weights_file_is_named_as_invalid() {
    let dir = tempfile::tempdir().unwrap();
    saved_tiny(dir.path());
    let file = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("not a valid safetensors file"),
        "{err}"
    );
}

#[test]
fn integer_tensor_where_floats_belong_names_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    saved_tiny(dir.path());
    rewrite_weights(dir.path(), |t| {
        let shape = t["fc.bias"].size();
        t.insert(
            "fc.bias".into(),
            Tensor::zeros(shape, (Kind::Int64, Device::Cpu)),
        );
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("fc.bias") && err.contains("floating-point"),
        "{err}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    saved_tiny(dir.path());
    rewrite_weights(dir.path(), |t| {
        t.remove("layer1.0.bn1.running_var");
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("layer1.0.bn1.running_var") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn extra_tensor_means_the_wrong_file_or_config() {
    let dir = tempfile::tempdir().unwrap();
    saved_tiny(dir.path());
    rewrite_weights(dir.path(), |t| {
        t.insert(
            "layer9.0.conv1.weight".into(),
            Tensor::zeros([1], (Kind::Float, Device::Cpu)),
        );
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("layer9.0.conv1.weight") && err.contains("unexpected"),
        "{err}"
    );
}

#[test]
fn config_weights_mismatch_names_the_tensor_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    saved_tiny(dir.path());
    // The config now says width 32; the weights are width 16.
    let config = std::fs::read_to_string(dir.path().join("config.json"))
        .unwrap()
        .replace("\"base_width\": 16", "\"base_width\": 32");
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("has shape") && err.contains("expected"),
        "{err}"
    );
}

#[test]
fn config_missing_a_field_names_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "resnet", "architectures": ["ResNet"]}"#,
    )
    .unwrap();
    let err = families::load(dir.path(), Device::Cpu, Kind::Float, true)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("block_type"),
        "{err}"
    );
}

#[test]
fn config_with_an_empty_stage_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    saved_tiny(dir.path());
    let config = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let value: serde_json::Value = serde_json::from_str(&config).unwrap();
    let mut value = value;
    value["layers"] = serde_json::json!([1, 0]);
    std::fs::write(dir.path().join("config.json"), value.to_string()).unwrap();
    let err = families::load(dir.path(), Device::Cpu, Kind::Float, true)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("layers"),
        "{err}"
    );
}

#[test]
fn missing_config_says_what_a_model_directory_needs() {
    let dir = tempfile::tempdir().unwrap();
    let err = families::load(dir.path(), Device::Cpu, Kind::Float, false)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("model.safetensors"),
        "{err}"
    );
}

#[test]
fn target_fraction_above_keep_all_is_rejected() {
    let text = DEFAULT_RECIPE.replace("fraction = 0.6", "fraction = 1.5");
    let err = Recipe::parse(&text, Path::new("r.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("target.fraction") && err.contains("(0, 1]"),
        "{err}"
    );
}

#[test]
fn a_label_weight_outside_zero_to_one_is_named() {
    let text = DEFAULT_RECIPE.replace("[finetune]", "[finetune]\nlabel_weight = 1.5");
    let err = Recipe::parse(&text, Path::new("r.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("finetune.label_weight") && err.contains("[0, 1]") && err.contains("1.5"),
        "{err}"
    );
}

#[test]
fn unknown_dtype_is_named() {
    let text = DEFAULT_RECIPE.replace("dtype = \"f32\"", "dtype = \"f8\"");
    let err = Recipe::parse(&text, Path::new("r.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("dtype") && err.contains("f8"), "{err}");
}

#[test]
fn unknown_proxy_is_named() {
    let text = DEFAULT_RECIPE.replace("cost = \"table\"", "cost = \"magic\"");
    let err = Recipe::parse(&text, Path::new("r.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("latency.cost") && err.contains("magic"),
        "{err}"
    );
}

#[test]
fn empty_dataset_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let gz = |name: &str, bytes: &[u8]| {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        std::fs::write(dir.path().join(name), enc.finish().unwrap()).unwrap();
    };
    gz(
        "train-images-idx3-ubyte.gz",
        &[0, 0, 8, 3, 0, 0, 0, 0, 0, 0, 0, 28, 0, 0, 0, 28],
    );
    gz("train-labels-idx1-ubyte.gz", &[0, 0, 8, 1, 0, 0, 0, 0]);
    let err = hawada::data::ImageDataset::load_idx(dir.path(), "train", Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("train-images-idx3-ubyte.gz") && err.contains("empty"),
        "{err}"
    );
}

#[test]
fn gates_of_another_model_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = Resnet::new(ResnetConfig::tiny(), Device::Cpu, Path::new("test")).unwrap();
    let other = Resnet::new(
        ResnetConfig {
            layers: vec![2, 1],
            ..ResnetConfig::tiny()
        },
        Device::Cpu,
        Path::new("test"),
    )
    .unwrap();
    Gates::new(other.groups(), GateOptions::default(), Device::Cpu)
        .unwrap()
        .save(dir.path())
        .unwrap();
    let mut gates = Gates::new(model.groups(), GateOptions::default(), Device::Cpu).unwrap();
    let err = gates.load(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("gates.json") && err.contains("do not match"),
        "{err}"
    );
}

#[test]
fn a_keep_set_that_empties_a_site_is_refused() {
    let model = Resnet::new(ResnetConfig::tiny(), Device::Cpu, Path::new("test")).unwrap();
    let mut keep = KeepSet::all(model.groups());
    keep.0[0].clear();
    let err = model.slim(&keep).err().unwrap().to_string();
    assert!(err.contains("min_keep"), "{err}");
}

/// A GGUF v3 file with llama metadata and one tensor of `ggml_type`, 32 elements of zeros.
fn tiny_gguf(path: &Path, magic: &[u8], ggml_type: u32) {
    let string = |s: &str| {
        let mut b = (s.len() as u64).to_le_bytes().to_vec();
        b.extend(s.as_bytes());
        b
    };
    let mut bytes = magic.to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(1u64.to_le_bytes()); // tensors
    bytes.extend(1u64.to_le_bytes()); // metadata
    bytes.extend(string("general.architecture"));
    bytes.extend(8u32.to_le_bytes());
    bytes.extend(string("llama"));
    bytes.extend(string("blk.0.attn_q.weight"));
    bytes.extend(1u32.to_le_bytes());
    bytes.extend(32u64.to_le_bytes());
    bytes.extend(ggml_type.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    while !bytes.len().is_multiple_of(32) {
        bytes.push(0);
    }
    bytes.extend([0u8; 128]);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_file_that_is_not_gguf_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    tiny_gguf(&path, b"GGML", 0);
    let err = families::load(&path, Device::Cpu, Kind::Float, false)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model.gguf") && err.contains("magic"), "{err}");
}

#[test]
fn an_unsupported_gguf_tensor_type_names_the_tensor_and_the_types_that_work() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    tiny_gguf(&path, b"GGUF", 16); // IQ2_XXS
    let gguf = hawada::io::gguf::Gguf::open(&path).unwrap();
    let err = gguf
        .tensor("blk.0.attn_q.weight")
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.gguf") && err.contains("blk.0.attn_q.weight") && err.contains("Q4_1"),
        "{err}"
    );
    // Loading the model stops at the first missing metadata key, named.
    let err = families::load(&path, Device::Cpu, Kind::Float, false)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("llama.attention.head_count"), "{err}");
}

fn llama_dir(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut config = serde_json::to_value(hawada::families::llama::LlamaConfig::tiny()).unwrap();
    edit(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    families::load(dir, Device::Cpu, Kind::Float, true)
        .err()
        .unwrap()
        .to_string()
}

#[test]
fn kv_heads_that_do_not_divide_the_query_heads_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = llama_dir(dir.path(), |c| c["num_key_value_heads"] = 3.into());
    assert!(
        err.contains("config.json") && err.contains("num_key_value_heads"),
        "{err}"
    );
}

#[test]
fn an_unknown_rope_type_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = llama_dir(dir.path(), |c| {
        c["rope_scaling"]["rope_type"] = "yarn".into()
    });
    assert!(
        err.contains("rope_scaling") && err.contains("yarn"),
        "{err}"
    );
}

#[test]
fn a_sequence_longer_than_the_models_context_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = serde_json::to_value(hawada::families::llama::LlamaConfig::tiny()).unwrap();
    config["max_position_embeddings"] = 64.into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let text = format!(
        r#"name = "long"
device = "cpu"
[model]
dir = "{}"
random_init = true
[data]
format = "text"
dir = "{}"
seq_len = 32
[latency]
workload = "decode"
batch = 1
context = 100
[target]
fraction = 0.5
[adapt]
steps = 1
batch = 1
probe_every = 1
checkpoint_every = 1
[finetune]
steps = 0
batch = 1
lr = 0.001
"#,
        dir.path().display(),
        dir.path().display()
    );
    let recipe_file = dir.path().join("long.toml");
    let recipe = Recipe::parse(&text, &recipe_file).unwrap();
    let err = hawada::pipeline::profile(
        &recipe,
        &recipe_file,
        &hawada::run_dir::RunDir::new(dir.path().join("run")),
        &hawada::progress::Silent,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("long.toml") && err.contains("latency.context") && err.contains("64"),
        "{err}"
    );
}

#[test]
fn decoding_a_vision_model_is_a_clear_error() {
    let model = Resnet::new(ResnetConfig::tiny(), Device::Cpu, Path::new("test")).unwrap();
    let err = model
        .cached_workload(hawada::model::Workload::Decode {
            batch: 1,
            context: 4,
        })
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("resnet") && err.contains("forward"), "{err}");
}

/// The tiny DINOv2 ONNX export of fixtures/dinov2 with every occurrence of `from` (an
/// initializer's name, in its initializer and in the nodes reading it) replaced by `to`, of the
/// same length.
fn onnx_with_renamed(dir: &Path, from: &str, to: &str) -> std::path::PathBuf {
    assert_eq!(from.len(), to.len());
    let onnx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/dinov2/model.onnx");
    let mut bytes = std::fs::read(onnx).unwrap();
    let mut found = 0;
    for i in 0..bytes.len().saturating_sub(from.len()) {
        if &bytes[i..i + from.len()] == from.as_bytes() {
            bytes[i..i + from.len()].copy_from_slice(to.as_bytes());
            found += 1;
        }
    }
    assert!(found > 0, "{from} not in the fixture");
    let path = dir.join("model.onnx");
    std::fs::write(&path, bytes).unwrap();
    path
}

fn onnx_err(path: &Path) -> String {
    families::load(path, Device::Cpu, Kind::Float, false)
        .err()
        .unwrap()
        .to_string()
}

#[test]
fn an_onnx_without_the_backbone_weights_says_what_it_expected() {
    let dir = tempfile::tempdir().unwrap();
    let path = onnx_with_renamed(dir.path(), "embeddings.cls_token", "embeddings.cls_tokXX");
    let err = onnx_err(&path);
    assert!(
        err.contains("model.onnx")
            && err.contains("embeddings.cls_token")
            && err.contains("DINOv2"),
        "{err}"
    );
}

#[test]
fn an_onnx_missing_a_projection_bias_names_the_initializer() {
    // Without its bias the fc1 weight cannot be named: the bias is reported missing.
    let dir = tempfile::tempdir().unwrap();
    let path = onnx_with_renamed(
        dir.path(),
        "backbone.encoder.layer.0.mlp.fc1.bias",
        "backbone.encoder.layer.0.mlp.fc1.bXXX",
    );
    let err = onnx_err(&path);
    assert!(
        err.contains("model.onnx") && err.contains("backbone.encoder.layer.0.mlp.fc1.bias"),
        "{err}"
    );
}

#[test]
fn a_truncated_onnx_is_named_as_unreadable() {
    let dir = tempfile::tempdir().unwrap();
    let onnx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/dinov2/model.onnx");
    let bytes = std::fs::read(onnx).unwrap();
    let path = dir.path().join("model.onnx");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = onnx_err(&path);
    assert!(
        err.contains("model.onnx") && err.contains("not a readable ONNX model"),
        "{err}"
    );
}

#[test]
fn a_tokenizer_with_more_ids_than_the_model_embeds_is_refused_naming_the_field() {
    // SmolLM2's tokenizer (49152 ids) for a tiny random LLaMA that embeds 64.
    let dir = tempfile::tempdir().unwrap();
    let TinyText {
        model_dir,
        texts,
        tokenizer_file,
    } = tiny_text(dir.path(), None);
    let text = format!(
        r#"name = "vocab"
device = "cpu"
[model]
dir = "{}"
random_init = true
[data]
format = "text"
dir = "{}"
tokenizer = "{}"
seq_len = 16
test_documents = 1
holdout = 1
[latency]
batch = 1
tokens = 16
[target]
fraction = 0.5
[adapt]
steps = 1
batch = 1
probe_every = 1
checkpoint_every = 1
[finetune]
steps = 0
batch = 1
lr = 0.001
"#,
        model_dir.display(),
        texts.display(),
        tokenizer_file.display()
    );
    let err = run_error(&dir.path().join("vocab.toml"), &text);
    assert!(
        err.contains("vocab.toml") && err.contains("data.tokenizer") && err.contains("49152"),
        "{err}"
    );
}

/// The error `hawada run` ends with for the recipe `text`, read as if from `recipe_file`, run
/// in `run/` beside it.
fn run_error(recipe_file: &Path, text: &str) -> String {
    let recipe = Recipe::parse(text, recipe_file).unwrap();
    let run_dir = hawada::run_dir::RunDir::new(recipe_file.parent().unwrap().join("run"));
    hawada::pipeline::run(&recipe, recipe_file, &run_dir, &hawada::progress::Silent)
        .err()
        .unwrap()
        .to_string()
}

#[test]
fn labels_in_the_fine_tune_of_a_backbone_are_refused_before_any_stage() {
    // The tiny DINOv2 backbone outputs features: there are no labels to take cross-entropy on.
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let text = format!(
        r#"name = "backbone"
device = "cpu"
[model]
dir = "{}"
[data]
format = "idx"
dir = "{}"
image_size = 28
[latency]
batch = 1
[target]
fraction = 0.5
[adapt]
steps = 1
batch = 1
probe_every = 1
checkpoint_every = 1
[finetune]
steps = 1
batch = 1
lr = 0.001
label_weight = 0.5
"#,
        root.join("fixtures/dinov2/model.onnx").display(),
        root.join(".cache/assets/fashion-mnist").display(),
    );
    let err = run_error(&dir.path().join("backbone.toml"), &text);
    assert!(
        err.contains("backbone.toml")
            && err.contains("finetune.label_weight")
            && err.contains("features"),
        "{err}"
    );
    // Refused before the profile, so nothing was measured.
    assert!(!dir.path().join("run/profile.json").exists());
}

#[test]
fn every_shipped_recipe_parses_and_names_a_model_that_exists_or_is_built() {
    // Recipes never rot silently: each one under recipes/ parses, and
    // its model is a committed config, a fetched asset, or a teacher the recipe trains.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut checked = 0;
    for folder in std::fs::read_dir(root.join("recipes")).unwrap() {
        let folder = folder.unwrap().path();
        let device = folder.file_name().unwrap().to_string_lossy().into_owned();
        for entry in std::fs::read_dir(&folder).unwrap() {
            let file = entry.unwrap().path();
            // Typed parse (unknown keys are errors); the value checks that need the recipe's
            // device (a GPU for h100/) run where it runs.
            let text = std::fs::read_to_string(&file).unwrap();
            let recipe: Recipe =
                toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            if device == "cpu" {
                Recipe::from_file(&file).unwrap_or_else(|e| panic!("{e}"));
            }
            let model = recipe.model.dir.to_string_lossy().into_owned();
            let committed = root.join(&recipe.model.dir).join("config.json").exists();
            let fetched = model.starts_with(".cache/assets/");
            let converted = model.starts_with(".cache/teachers/dinov2");
            let trained = recipe.teacher_training.is_some();
            assert!(
                committed || fetched || converted || trained,
                "{}: model {model} is neither committed, fetched, converted nor trained",
                file.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 15, "{checked} recipes");
}

#[test]
fn an_unknown_family_is_named_with_the_supported_ones() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "bert", "architectures": ["BertModel"]}"#,
    )
    .unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("config.json") && err.contains("`bert`") && err.contains("dinov2"),
        "{err}"
    );
}

#[test]
fn a_failed_checkpoint_write_leaves_the_previous_checkpoint_intact() {
    // A full disk fails the write of the temporary file; the previous file must survive. The
    // temporary file's name (unique per process and write: `<name>.<pid>.<n>.tmp`) is made
    // too long for the file system to fail that write: the file's own name is 250 bytes.
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("gates.safetensors");
    let file = dir.path().join(format!("{}.safetensors", "g".repeat(238)));
    let mut tensors = BTreeMap::new();
    tensors.insert("logits".to_string(), Tensor::from_slice(&[1.0f32, 2.0]));
    hawada::io::safetensors::write(&short, &tensors).unwrap();
    std::fs::rename(&short, &file).unwrap();
    let before = std::fs::read(&file).unwrap();
    tensors.insert("logits".to_string(), Tensor::from_slice(&[3.0f32, 4.0]));
    let err = hawada::io::safetensors::write(&file, &tensors)
        .unwrap_err()
        .to_string();
    assert!(err.contains(".tmp"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), before);
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temporary file is left"
    );
}

#[test]
fn a_download_whose_sha256_differs_is_refused_and_removed() {
    // fetch-assets.sh run from a copy of the checkout whose cached download is corrupt.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let copy = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(copy.path().join("scripts")).unwrap();
    std::fs::copy(
        root.join("scripts/fetch-assets.sh"),
        copy.path().join("scripts/fetch-assets.sh"),
    )
    .unwrap();
    let downloads = copy.path().join(".cache/downloads");
    std::fs::create_dir_all(&downloads).unwrap();
    let deb = downloads.join("dataset-fashion-mnist.deb");
    std::fs::write(&deb, b"not the package").unwrap();
    let out = std::process::Command::new("bash")
        .arg(copy.path().join("scripts/fetch-assets.sh"))
        .arg("fashion-mnist")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("fashion-mnist") && stderr.contains("sha256 mismatch"),
        "{stderr}"
    );
    assert!(!deb.exists(), "the corrupt download is removed");
}

#[test]
fn a_nan_loss_stops_the_run_naming_the_step_and_the_last_checkpoint() {
    // A teacher with a NaN weight: the first gate step's KD is NaN.
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("teacher");
    let model = saved_tiny(&model_dir);
    let mut tensors = hawada::io::safetensors::named_tensors(model.var_store());
    let name = tensors
        .keys()
        .find(|n| n.ends_with("conv1.weight"))
        .unwrap()
        .clone();
    tensors.insert(name.clone(), tensors[&name].full_like(f64::NAN));
    hawada::io::safetensors::write(&model_dir.join("model.safetensors"), &tensors).unwrap();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/assets/fashion-mnist");
    let text = format!(
        r#"name = "nan"
device = "cpu"
[model]
dir = "{}"
[data]
format = "idx"
dir = "{}"
holdout = 64
test_limit = 64
[latency]
batch = 4
warmup_runs = 10
timed_runs = 50
fit_archs = 1
holdout_archs = 1
cost = "flops"
[target]
fraction = 0.7
[adapt]
steps = 5
batch = 8
probe_every = 100
checkpoint_every = 1
[finetune]
steps = 0
batch = 8
lr = 0.001
[eval]
batch = 64
"#,
        model_dir.display(),
        data.display()
    );
    let err = run_error(&dir.path().join("nan.toml"), &text);
    assert!(
        err.contains("step 0") && err.contains("NaN") && err.contains("checkpoints/adapt"),
        "{err}"
    );
}

// Issue 24: hostile inputs. Each class of bad input below is an error naming the file or field,
// the value and what is allowed, never a panic nor a silently clamped value.

/// `DEFAULT_RECIPE` with `from` replaced by `to`, parsed: the error text.
fn recipe_err(from: &str, to: &str) -> String {
    assert!(DEFAULT_RECIPE.contains(from), "{from}");
    Recipe::parse(&DEFAULT_RECIPE.replace(from, to), Path::new("r.toml"))
        .err()
        .unwrap_or_else(|| panic!("`{to}` was accepted"))
        .to_string()
}

#[test]
fn issue24_unvalidated_numbers_are_refused_naming_the_field_value_and_range() {
    for (from, to, field, value) in [
        ("lr = 0.002\nkd", "lr = -1\nkd", "finetune.lr", "-1"),
        ("lr = 0.002\nkd", "lr = 1e8\nkd", "finetune.lr", "100000000"),
        (
            "holdout = 2000",
            "holdout = 2000\ntest_limit = 0",
            "data.test_limit",
            "0",
        ),
        (
            "holdout = 2000",
            "holdout = 2000\ntest_limit = -3",
            "data.test_limit",
            "-3",
        ),
        ("holdout = 2000", "holdout = -5", "data.holdout", "-5"),
        (
            "epochs = 2.0",
            "epochs = -1",
            "teacher_training.epochs",
            "-1",
        ),
        (
            "channel_multiples = [1, 8, 16]",
            "channel_multiples = [0]",
            "export.channel_multiples[0]",
            "0",
        ),
        (
            "lr = 0.002\n[teacher",
            "lr = 50\n[teacher",
            "teacher_training.lr",
            "50",
        ),
    ] {
        let err = recipe_err(from, to);
        assert!(
            err.contains("r.toml")
                && err.contains(field)
                && err.contains(&format!("found {value}"))
                && (err.contains("in (") || err.contains("in [") || err.contains("at least")),
            "{to}: {err}"
        );
    }
}

#[test]
fn issue24_a_zero_image_size_is_refused_naming_the_field() {
    let err = recipe_err("holdout = 2000", "holdout = 2000\nimage_size = 0");
    assert!(
        err.contains("data.image_size") && err.contains("found 0") && err.contains("[1, 4096]"),
        "{err}"
    );
}

/// An IDX dataset of 28×28 images in `dir`, `train` and `t10k` alike, with these labels.
fn tiny_idx(dir: &Path, labels: &[u8]) {
    use std::io::Write;
    std::fs::create_dir_all(dir).unwrap();
    let n = labels.len() as u32;
    for split in ["train", "t10k"] {
        let mut images = vec![0, 0, 8, 3];
        images.extend(n.to_be_bytes());
        images.extend(28u32.to_be_bytes());
        images.extend(28u32.to_be_bytes());
        images.extend((0..n as usize * 784).map(|i| (i % 251) as u8));
        let mut label_bytes = vec![0, 0, 8, 1];
        label_bytes.extend(n.to_be_bytes());
        label_bytes.extend(labels);
        for (kind, bytes) in [("images-idx3", images), ("labels-idx1", label_bytes)] {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(&bytes).unwrap();
            let file = dir.join(format!("{split}-{kind}-ubyte.gz"));
            std::fs::write(file, enc.finish().unwrap()).unwrap();
        }
    }
}

/// A recipe over the model in `model_dir` and the IDX data in `data_dir`, with `extra` lines
/// appended to `[data]` and `label_weight` in `[finetune]`.
fn idx_recipe(model_dir: &Path, data_dir: &Path, data_extra: &str, label_weight: f64) -> String {
    format!(
        r#"name = "hostile"
device = "cpu"
[model]
dir = "{}"
[data]
format = "idx"
dir = "{}"
{data_extra}
[latency]
batch = 1
cost = "flops"
[target]
fraction = 0.5
[adapt]
steps = 1
batch = 1
probe_every = 1
checkpoint_every = 1
[finetune]
steps = 1
batch = 1
lr = 0.001
label_weight = {label_weight}
"#,
        model_dir.display(),
        data_dir.display()
    )
}

#[test]
fn issue24_a_dataset_of_one_image_is_refused_not_clamped() {
    let dir = tempfile::tempdir().unwrap();
    tiny_idx(&dir.path().join("data"), &[0]);
    let text = idx_recipe(
        &dir.path().join("none"),
        &dir.path().join("data"),
        "holdout = 1",
        0.0,
    );
    let err = run_error(&dir.path().join("one.toml"), &text);
    assert!(
        err.contains("data") && err.contains("holds 1 images") && err.contains("at least 2"),
        "{err}"
    );
}

#[test]
fn issue24_a_holdout_that_leaves_nothing_to_train_on_is_refused_not_clamped() {
    let dir = tempfile::tempdir().unwrap();
    tiny_idx(&dir.path().join("data"), &[0, 1, 2, 3, 4]);
    let data = dir.path().join("data");
    let text = idx_recipe(&dir.path().join("none"), &data, "holdout = 1000000000", 0.0);
    let err = run_error(&dir.path().join("holdout.toml"), &text);
    assert!(
        err.contains("data.holdout = 1000000000") && err.contains("[1, 4]"),
        "{err}"
    );
}

#[test]
fn issue24_a_text_corpus_of_one_sequence_is_refused_not_clamped() {
    let dir = tempfile::tempdir().unwrap();
    let TinyText {
        model_dir,
        texts,
        tokenizer_file,
    } = tiny_text(dir.path(), Some(49152));
    // The first document alone (about 150 tokens) trains: one sequence of 101 tokens.
    let text = format!(
        r#"name = "one-sequence"
device = "cpu"
[model]
dir = "{}"
random_init = true
[data]
format = "text"
dir = "{}"
tokenizer = "{}"
seq_len = 100
test_documents = 2
holdout = 1
[latency]
batch = 1
tokens = 16
[target]
fraction = 0.5
[adapt]
steps = 1
batch = 1
probe_every = 1
checkpoint_every = 1
[finetune]
steps = 0
batch = 1
lr = 0.001
"#,
        model_dir.display(),
        texts.display(),
        tokenizer_file.display()
    );
    let err = run_error(&dir.path().join("one.toml"), &text);
    assert!(
        err.contains("holds 1 sequences") && err.contains("at least 2"),
        "{err}"
    );
}

#[test]
fn issue24_an_out_of_range_label_with_label_weight_is_refused() {
    // The tiny ResNet has 5 classes; one label is 7.
    let dir = tempfile::tempdir().unwrap();
    saved_tiny(&dir.path().join("teacher"));
    let data = dir.path().join("data");
    tiny_idx(&data, &[0, 1, 2, 7, 4, 3]);
    // In bf16: the check's forward runs in the model's dtype.
    let text = idx_recipe(&dir.path().join("teacher"), &data, "holdout = 2", 0.5)
        .replace("device = \"cpu\"", "device = \"cpu\"\ndtype = \"bf16\"");
    let err = run_error(&dir.path().join("labels.toml"), &text);
    assert!(
        err.contains("labels go up to 7")
            && err.contains("5 classes")
            && err.contains("finetune.label_weight"),
        "{err}"
    );
}

#[test]
fn issue24_grey_images_for_an_rgb_model_name_data_channels() {
    let dir = tempfile::tempdir().unwrap();
    let config = ResnetConfig {
        num_channels: 3,
        ..ResnetConfig::tiny()
    };
    let teacher = dir.path().join("teacher");
    Resnet::new(config, Device::Cpu, Path::new("test"))
        .unwrap()
        .save(&teacher)
        .unwrap();
    let data = dir.path().join("data");
    tiny_idx(&data, &[0, 1, 2, 3]);
    let text = idx_recipe(&teacher, &data, "holdout = 2", 0.0);
    let err = run_error(&dir.path().join("grey.toml"), &text);
    assert!(
        err.contains("grey.toml")
            && err.contains("data.channels")
            && err.contains("1 channel(s)")
            && err.contains("set data.channels = 3"),
        "{err}"
    );
}

#[test]
fn issue24_absurd_config_sizes_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    saved_tiny(dir.path());
    let resnet = |field: &str, value: serde_json::Value| {
        let path = dir.path().join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let original = config.clone();
        config[field] = value;
        std::fs::write(&path, config.to_string()).unwrap();
        let err = families::load(dir.path(), Device::Cpu, Kind::Float, true)
            .err()
            .unwrap()
            .to_string();
        std::fs::write(&path, original.to_string()).unwrap();
        err
    };
    let err = resnet("base_width", serde_json::json!(1_000_000));
    assert!(
        err.contains("base_width") && err.contains("1000000") && err.contains("sanity limit"),
        "{err}"
    );
    let err = resnet("layers", serde_json::json!([1_000_000, 1]));
    assert!(
        err.contains("layers") && err.contains("1 to 1024 blocks"),
        "{err}"
    );
    for (field, value) in [
        ("hidden_size", 1_000_000_000i64),
        ("intermediate_size", 1_000_000_000_000),
        ("num_hidden_layers", 10_000_000),
    ] {
        let err = llama_dir(dir.path(), |c| c[field] = value.into());
        assert!(
            err.contains("config.json")
                && err.contains(field)
                && err.contains(&value.to_string())
                && err.contains("sanity limit"),
            "{field}: {err}"
        );
    }
}

#[test]
fn issue24_a_cpu_allocation_failure_gets_the_out_of_memory_guidance() {
    // 2^50 floats (4 PiB): the CPU allocator refuses at once, in its own wording.
    let stage = ("latency measurement", "latency.batch", 1_000_000);
    let err = hawada::pipeline::out_of_memory_as_error(Device::Cpu, stage, || {
        Ok(Tensor::zeros([1i64 << 50], (Kind::Float, Device::Cpu)))
    })
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("out of memory during latency measurement")
            && err.contains("latency.batch = 1000000")
            && err.contains("500000"),
        "{err}"
    );
}

/// A recipe that trains a tiny ResNet teacher into `model_dir` for `epochs` on the IDX data in
/// `data_dir`, timed lightly (profile only).
fn teacher_training_recipe(model_dir: &Path, data_dir: &Path, epochs: f64) -> String {
    format!(
        r#"name = "self-trained"
device = "cpu"
[model]
dir = "{}"
[teacher_training]
epochs = {epochs:?}
batch = 2
lr = 0.001
[teacher_training.config]
architectures = ["ResNet"]
model_type = "resnet"
block_type = "basic"
layers = [1, 1]
stem = "small"
num_channels = 1
image_size = 28
num_labels = 10
base_width = 8
channels_per_gate = 2
[data]
format = "idx"
dir = "{}"
holdout = 2
[latency]
batch = 1
warmup_runs = 1
timed_runs = 2
fit_archs = 1
holdout_archs = 1
cost = "flops"
[target]
fraction = 0.5
[adapt]
steps = 1
batch = 2
probe_every = 1
checkpoint_every = 1
[finetune]
steps = 0
batch = 2
lr = 0.001
"#,
        model_dir.display(),
        data_dir.display()
    )
}

fn profile(recipe_file: &Path, text: &str) -> hawada::error::Result<hawada::run_dir::Profile> {
    let recipe = Recipe::parse(text, recipe_file).unwrap();
    let run_dir = hawada::run_dir::RunDir::new(recipe_file.parent().unwrap().join("run"));
    hawada::pipeline::profile(&recipe, recipe_file, &run_dir, &hawada::progress::Silent)
}

#[test]
fn issue24_teacher_training_never_overwrites_a_config_json_it_did_not_write() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    tiny_idx(&data, &[0, 1, 2, 3, 4, 5]);
    let model_dir = dir.path().join("users-model");
    std::fs::create_dir_all(&model_dir).unwrap();
    let users = r#"{"model_type": "resnet", "base_width": 64}"#;
    std::fs::write(model_dir.join("config.json"), users).unwrap();
    let text = teacher_training_recipe(&model_dir, &data, 1.0);
    let err = profile(&dir.path().join("t.toml"), &text)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("t.toml") && err.contains("model.dir") && err.contains("would overwrite it"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(model_dir.join("config.json")).unwrap(),
        users
    );
}

#[test]
fn issue24_a_cached_teacher_made_by_another_teacher_training_is_trained_again() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    tiny_idx(&data, &[0, 1, 2, 3, 4, 5]);
    let model_dir = dir.path().join("teacher");
    let file = dir.path().join("t.toml");
    let first = teacher_training_recipe(&model_dir, &data, 1.0);
    profile(&file, &first).unwrap();
    let weights = || std::fs::read(model_dir.join("model.safetensors")).unwrap();
    let trained_once = weights();
    let recipe = |text: &str| Recipe::parse(text, &file).unwrap();
    assert!(!hawada::pipeline::needs_teacher_training(&recipe(&first)));
    // Two epochs instead of one: the cached teacher is not what this recipe trains.
    let second = teacher_training_recipe(&model_dir, &data, 2.0);
    assert!(hawada::pipeline::needs_teacher_training(&recipe(&second)));
    std::fs::remove_dir_all(dir.path().join("run")).unwrap();
    profile(&file, &second).unwrap();
    assert_ne!(weights(), trained_once);
    assert!(!hawada::pipeline::needs_teacher_training(&recipe(&second)));
}

#[test]
fn issue24_toml_errors_name_the_key_line_and_column_never_the_whole_text() {
    let err = |from: &str, to: &str| {
        assert!(DEFAULT_RECIPE.contains(from), "{from}");
        Recipe::parse(&DEFAULT_RECIPE.replace(from, to), Path::new("r.toml"))
            .unwrap_err()
            .to_string()
    };
    let too_large = err("batch = 256", "batch = 99999999999999999999999");
    assert!(
        too_large.contains("field `latency.batch`")
            && too_large.contains("number too large")
            && too_large.contains("(line 37, column 9)"),
        "{too_large}"
    );
    let syntax = err("seed = 0", "seed = [0");
    assert!(
        syntax.contains("invalid array") && syntax.contains("(line 7, column 1)"),
        "{syntax}"
    );
    let missing = err("[target]\nfraction = 0.6", "");
    assert_eq!(
        missing,
        "r.toml: field `target`: missing; the recipe must set it"
    );
    let wrong_type = err("holdout = 2000", "holdout = 2000.5");
    assert!(
        wrong_type.contains("field `data.holdout`") && wrong_type.contains("line 34"),
        "{wrong_type}"
    );
}

/// Trains the tiny ResNet `model` on random 12×12 batches with checkpoints in `checkpoints`;
/// the error it stops with.
fn train_tiny_err(model: &mut Resnet, checkpoints: &Path) -> String {
    let metrics = hawada::run_dir::MetricsLog::new(checkpoints.with_extension("jsonl"));
    let workers = hawada::dist::Workers::single();
    let opts = hawada::train::WeightTraining {
        stage: "finetune",
        steps: 4,
        lr: 1e-3,
        checkpoint_every: 2,
        checkpoint_dir: checkpoints,
        seed: 0,
        workers: &workers,
        keep_best: None,
    };
    let mut next = || {
        (
            Tensor::randn([2, 1, 12, 12], (Kind::Float, Device::Cpu)),
            Tensor::from_slice(&[0i64, 1]),
        )
    };
    hawada::train::train_weights(
        model,
        hawada::train::Objective::Labels,
        &mut next,
        &opts,
        &metrics,
        &hawada::progress::Silent,
    )
    .err()
    .unwrap()
    .to_string()
}

/// The tiny ResNet's tensors with `conv1.weight` (of the stem) all NaN.
fn with_nan_stem(model: &Resnet) -> (String, BTreeMap<String, Tensor>) {
    let mut tensors = hawada::io::safetensors::named_tensors(model.var_store());
    let name = tensors
        .keys()
        .find(|n| n.ends_with("conv1.weight"))
        .unwrap()
        .clone();
    tensors.insert(name.clone(), tensors[&name].full_like(f64::NAN));
    (name, tensors)
}

#[test]
fn issue24_nan_weights_in_a_checkpoint_name_the_tensor_not_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = Resnet::new(ResnetConfig::tiny(), Device::Cpu, Path::new("test")).unwrap();
    let checkpoints = dir.path().join("checkpoints");
    std::fs::create_dir_all(&checkpoints).unwrap();
    let (name, tensors) = with_nan_stem(&model);
    hawada::io::safetensors::write(&checkpoints.join("model.safetensors"), &tensors).unwrap();
    std::fs::write(checkpoints.join("state.json"), r#"{"step": 2}"#).unwrap();
    let err = train_tiny_err(&mut model, &checkpoints);
    assert!(
        err.contains("checkpoints/model.safetensors")
            && err.contains(&format!("tensor `{name}`"))
            && err.contains("NaN")
            && !err.contains("loss"),
        "{err}"
    );
}

#[test]
fn issue24_a_nan_before_any_checkpoint_names_no_empty_folder_as_the_last_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = Resnet::new(ResnetConfig::tiny(), Device::Cpu, Path::new("test")).unwrap();
    let (_, tensors) = with_nan_stem(&model);
    let file = dir.path().join("nan.safetensors");
    hawada::io::safetensors::write(&file, &tensors).unwrap();
    hawada::io::safetensors::load_file_into(model.var_store(), &file).unwrap();
    let err = train_tiny_err(&mut model, &dir.path().join("checkpoints"));
    assert!(
        err.contains("step 0")
            && err.contains("NaN")
            && err.contains("before any checkpoint")
            && !err.contains("last good checkpoint"),
        "{err}"
    );
}
