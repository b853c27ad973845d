//! Shared helpers: temporary lakes, the shipped data, small datasets and tiny
//! models built through the real stages.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};

use lc_lake::lake::Lake;
use pipeline::stages::{self, Ctx};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn data(name: &str) -> String {
    repo().join("data").join(name).to_string_lossy().to_string()
}

/// A file under `tests/fixtures` (everything the tests read lives in the
/// repository).
pub fn fixture(name: &str) -> PathBuf {
    let p = repo().join("tests/fixtures").join(name);
    assert!(p.exists(), "{} is missing from the repository", p.display());
    p
}

/// The binary under test: this build's, or `PIPELINE_TEST_BIN` (a long
/// campaign runs a copy while the tree is rebuilt).
pub fn bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("PIPELINE_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_pipeline").to_string())
    })
}

pub struct TestLake {
    pub dir: tempfile::TempDir,
    pub ctx: Ctx,
}

impl TestLake {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path().join("lake").to_str().unwrap()).unwrap();
        TestLake {
            dir,
            ctx: Ctx::new(lake),
        }
    }

    pub fn lake(&self) -> &Lake {
        &self.ctx.lake
    }

    pub fn url(&self) -> String {
        self.ctx.lake.url().to_string()
    }

    pub fn run(&self, stage: &str, pairs: &[(&str, &str)]) -> String {
        stages::run_pairs(&self.ctx, stage, pairs).unwrap_or_else(|e| panic!("stage {stage} failed: {e}"))
    }

    pub fn run_err(&self, stage: &str, pairs: &[(&str, &str)]) -> String {
        match stages::run_pairs(&self.ctx, stage, pairs) {
            Ok(s) => panic!("stage {stage} should have failed but said: {s}"),
            Err(e) => e.to_string(),
        }
    }

    /// A file in the test's temporary directory.
    pub fn file(&self, name: &str, content: &[u8]) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        p.to_string_lossy().to_string()
    }
}

/// The first `n` stories of a separator-delimited corpus file.
pub fn first_stories(path: &str, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let sep = "\n<|endoftext|>\n";
    let parts: Vec<&str> = text.split(sep).take(n).collect();
    parts.join(sep) + sep
}

/// A lake holding dataset `small`: the first `n_train` / `n_val` stories of the
/// shipped sample, tokenized and packed (hf, T given).
pub fn small_dataset(n_train: usize, n_val: usize, t: usize) -> TestLake {
    let tl = TestLake::new();
    let train = tl.file(
        "train.txt",
        first_stories(&data("tinystories_train_sample.txt"), n_train).as_bytes(),
    );
    let val = tl.file(
        "val.txt",
        first_stories(&data("tinystories_val_sample.txt"), n_val).as_bytes(),
    );
    let tok = data("tokenizer.json");
    let ts = t.to_string();
    tl.run(
        "ingest",
        &[("dataset", "small"), ("train", &train), ("validation", &val)],
    );
    tl.run("tokenize", &[("dataset", "small"), ("tokenizer", &tok)]);
    tl.run(
        "pack",
        &[
            ("dataset", "small"),
            ("T", &ts),
            ("mode", "hf"),
            ("shards", "2"),
            ("batch", "50"),
        ],
    );
    tl.run("vocab", &[("dataset", "small")]);
    tl
}

/// A tiny trained model (d = 8, 2 layers, 2 heads) on a small dataset
/// (training takes a few seconds), shared by several tests. They take turns:
/// the guard serialises them, since they add and replace artifacts.
pub fn tiny() -> MutexGuard<'static, TestLake> {
    static TINY: OnceLock<Mutex<TestLake>> = OnceLock::new();
    let lake = TINY.get_or_init(|| {
        let tl = small_dataset(80, 30, 32);
        tl.run(
            "train",
            &[
                ("dataset", "small"),
                ("name", "tiny"),
                ("depth", "2"),
                ("width", "8"),
                ("heads", "2"),
                ("context", "64"),
                ("epochs", "2"),
                ("lr", "0.01"),
                ("batch", "8"),
            ],
        );
        Mutex::new(tl)
    });
    lake.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Relative difference |a - b| / max(|b|, tiny).
pub fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-300)
}

/// The micro study of the whole-study tests: four tiny models (widths 4 and
/// 8, seeds 0 and 1, one epoch) on 60 training and 20 validation stories;
/// the experiment file's path.
pub fn micro_experiment(tl: &TestLake) -> String {
    let train = tl.file(
        "tr.txt",
        first_stories(&data("tinystories_train_sample.txt"), 60).as_bytes(),
    );
    let val = tl.file(
        "va.txt",
        first_stories(&data("tinystories_val_sample.txt"), 20).as_bytes(),
    );
    tl.file(
        "exp.toml",
        format!(
            r#"[data]
dataset = "micro"
train = "{train}"
validation = "{val}"
tokenizer = "{}"
T = 32
[train]
heads = 2
context = 64
lr = 0.01
batch = 8
[grid]
depths = [1]
widths = [4, 8]
epochs = [1]
weight_decays = [0.0005]
seeds = [0, 1]
[collect]
batch = 8
[correlate]
permutations = 200
"#,
            data("tokenizer.json")
        )
        .as_bytes(),
    )
}

/// The queries whose results a study must reproduce to the last bit however
/// its work was spread over workers: training logs, validation, class
/// statistics and decisions (analyze's row means are summed per thread).
pub const BIT_EXACT_RESULTS: [&str; 4] = [
    "SELECT model, step, loss, grad_norm FROM train_log ORDER BY model, step",
    "SELECT model, val_loss, val_acc FROM models ORDER BY model",
    "SELECT model, layer, class_id, count, mean, m2 FROM class_stats ORDER BY model, layer, class_id",
    "SELECT model, layer, class_id, samples, agree, linear_correct, ncc_correct FROM decisions \
     ORDER BY model, layer, class_id",
];

/// A query's result as the lines of its printed table (every float in full,
/// so equal lines are equal values).
pub fn table_lines(lake: &Lake, q: &str) -> Vec<String> {
    let batches = pipeline::sql::Sql::open(lake).unwrap().query(q, false).unwrap();
    arrow::util::pretty::pretty_format_batches(&batches)
        .unwrap()
        .to_string()
        .lines()
        .map(str::to_string)
        .collect()
}
