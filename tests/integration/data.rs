//! Data stages: ingest, tokenize, pack, vocab.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{AsArray, StringArray};
use arrow::datatypes::{DataType, Field, Schema, UInt32Type, UInt64Type};
use arrow::record_batch::RecordBatch;
use lc_lake::artifact::Artifact;
use pipeline::tokenizer::TextTokenizer;
use serde_json::Value;

use crate::common::{TestLake, data, first_stories, fixture};

fn reference() -> Value {
    let text =
        std::fs::read_to_string(crate::common::repo().join("tests/fixtures/token_reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn shipped_tokenizer() -> TextTokenizer {
    let bytes = std::fs::read(data("tokenizer.json")).unwrap();
    TextTokenizer::from_bytes(&bytes, "data/tokenizer.json").unwrap()
}

/// Ids of known sentences, from OpenAI's tiktoken on the same GPT-2 files
/// (tests/fixtures/make_token_reference.py).
#[test]
fn known_sentences_get_gpt2_ids() {
    let tok = shipped_tokenizer();
    assert!(tok.uses_fast_path());
    assert_eq!(tok.vocab_size(), 50257);
    assert_eq!(tok.token_id("<|endoftext|>"), Some(50256));
    assert_eq!(tok.encode("Hello world").unwrap(), vec![15496, 995]);
    for s in reference()["sentences"].as_array().unwrap() {
        let text = s["text"].as_str().unwrap();
        let want: Vec<u32> = s["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text).unwrap(), want, "fast path: {text:?}");
        assert_eq!(
            tok.encode_reference(text).unwrap(),
            want,
            "tokenizers crate: {text:?}"
        );
    }
}

/// The shipped tokenizer.json is the GPT-2 vocabulary and merges.
#[test]
fn shipped_tokenizer_is_built_from_the_gpt2_files() {
    let built = pipeline::tokenizer::build_gpt2_tokenizer(
        fixture("gpt2/encoder.json").to_str().unwrap(),
        fixture("gpt2/vocab.bpe").to_str().unwrap(),
    )
    .unwrap();
    let rebuilt = TextTokenizer::from_bytes(built.as_bytes(), "rebuilt").unwrap();
    assert_eq!(rebuilt.fingerprint(), shipped_tokenizer().fingerprint());
    assert_eq!(built, std::fs::read_to_string(data("tokenizer.json")).unwrap());
}

/// The fast path equals the tokenizers crate's full pipeline on every
/// document of the shipped corpora (800 stories, 0.64 MB, both text forms:
/// raw train file and Hugging Face validation split).
#[test]
fn fast_path_equals_the_reference_encoder_on_whole_files() {
    let tok = shipped_tokenizer();
    for f in ["tinystories_val_sample.txt", "tinystories_train_sample.txt"] {
        let text = std::fs::read_to_string(data(f)).unwrap();
        let mut docs = 0;
        for doc in text.split("\n<|endoftext|>\n") {
            assert_eq!(
                tok.encode(doc).unwrap(),
                tok.encode_reference(doc).unwrap(),
                "{f}: {doc:.80}"
            );
            docs += 1;
        }
        assert!(docs >= 200, "{f}: {docs}");
    }
}

fn checksum(ids: impl Iterator<Item = u32>) -> u64 {
    const MOD: u128 = (1 << 61) - 1;
    let mut s: u128 = 0;
    for (k, t) in ids.enumerate() {
        s = (s + (k as u128 + 1) * t as u128) % MOD;
    }
    s as u64
}

/// Ingest + tokenize of the shipped sample reproduce tiktoken's documents
/// and ids exactly (per-document counts and a positional checksum).
#[test]
fn tokens_of_the_shipped_sample_match_an_independent_implementation() {
    let tl = TestLake::new();
    tl.run(
        "ingest",
        &[
            ("train", &data("tinystories_train_sample.txt")),
            ("validation", &data("tinystories_val_sample.txt")),
        ],
    );
    tl.run("tokenize", &[("tokenizer", &data("tokenizer.json"))]);
    let refs = reference();
    for (split, file) in [
        ("train", "data/tinystories_train_sample.txt"),
        ("validation", "data/tinystories_val_sample.txt"),
    ] {
        let want = &refs[file];
        let a = Artifact::new("tokens", &[("dataset", "sample"), ("split", split)]).unwrap();
        let mut counts = Vec::new();
        let mut all = Vec::new();
        let mut first = None;
        for b in tl.lake().read_artifact(&a).unwrap() {
            let lists = b.column(2).as_list::<i32>();
            for i in 0..b.num_rows() {
                let ids: Vec<u32> = lists.value(i).as_primitive::<UInt32Type>().values().to_vec();
                counts.push(ids.len() as u64);
                if first.is_none() {
                    first = Some(ids.clone());
                }
                all.extend(ids);
            }
        }
        assert_eq!(
            counts.len() as u64,
            want["documents"].as_u64().unwrap(),
            "{split}"
        );
        let want_counts: Vec<u64> = want["doc_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert_eq!(counts, want_counts, "{split}");
        assert_eq!(all.len() as u64, want["tokens"].as_u64().unwrap());
        assert_eq!(
            checksum(all.into_iter()),
            want["checksum"].as_u64().unwrap(),
            "{split}"
        );
        let first_want: Vec<u32> = want["first_doc_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(first.unwrap(), first_want);
    }
    // Re-running is a no-op that says so.
    let again = tl.run("tokenize", &[("tokenizer", &data("tokenizer.json"))]);
    assert!(again.contains("up to date"), "{again}");
}

fn read_tokens(tl: &TestLake, dataset: &str, split: &str) -> Vec<Vec<u32>> {
    let a = Artifact::new("tokens", &[("dataset", dataset), ("split", split)]).unwrap();
    let mut out = Vec::new();
    for b in tl.lake().read_artifact(&a).unwrap() {
        let lists = b.column(2).as_list::<i32>();
        for i in 0..b.num_rows() {
            out.push(lists.value(i).as_primitive::<UInt32Type>().values().to_vec());
        }
    }
    out
}

fn read_chunks(tl: &TestLake, dataset: &str, split: &str) -> Vec<Vec<u32>> {
    let a = Artifact::new("chunks", &[("dataset", dataset), ("split", split)]).unwrap();
    let mut out = Vec::new();
    for b in tl.lake().read_artifact(&a).unwrap() {
        let ids = b.column(0).as_primitive::<UInt64Type>();
        let l = b.column(1).as_fixed_size_list();
        let t = l.value_length() as usize;
        let vals = l.values().as_primitive::<UInt32Type>().values();
        for i in 0..b.num_rows() {
            assert_eq!(ids.value(i), out.len() as u64);
            out.push(vals[i * t..(i + 1) * t].to_vec());
        }
    }
    out
}

/// Stage-level check of `hf` packing on real tokens with uneven shards and
/// batches, against the straightforward formulation, and of the census.
#[test]
fn pack_and_vocab_on_real_tokens() {
    let tl = TestLake::new();
    let train = tl.file(
        "t.txt",
        first_stories(&data("tinystories_train_sample.txt"), 257).as_bytes(),
    );
    tl.run("ingest", &[("dataset", "p"), ("train", &train)]);
    tl.run(
        "tokenize",
        &[("dataset", "p"), ("tokenizer", &data("tokenizer.json"))],
    );
    tl.run(
        "pack",
        &[
            ("dataset", "p"),
            ("T", "64"),
            ("mode", "hf"),
            ("shards", "3"),
            ("batch", "40"),
        ],
    );
    let docs = read_tokens(&tl, "p", "train");
    let (n, t, shards, batch) = (docs.len(), 64, 3, 40);
    let mut want = Vec::new();
    for s in 0..shards {
        let start = (n / shards) * s + s.min(n % shards);
        let end = start + n / shards + usize::from(s < n % shards);
        for b in docs[start..end].chunks(batch) {
            let cat: Vec<u32> = b.concat();
            for c in cat.chunks_exact(t) {
                want.push(c.to_vec());
            }
        }
    }
    let got = read_chunks(&tl, "p", "train");
    assert_eq!(got, want);

    tl.run("vocab", &[("dataset", "p")]);
    let a = Artifact::new("vocab", &[("dataset", "p"), ("split", "train")]).unwrap();
    let mut counts: HashMap<u32, u64> = HashMap::new();
    for c in &got {
        for &id in &c[1..] {
            *counts.entry(id).or_default() += 1;
        }
    }
    let batches = tl.lake().read_artifact(&a).unwrap();
    let mut rows = 0;
    for b in &batches {
        let ids = b.column(0).as_primitive::<UInt32Type>();
        let cnt = b.column(1).as_primitive::<UInt64Type>();
        let text = b.column(2).as_string::<i32>();
        for i in 0..b.num_rows() {
            assert_eq!(cnt.value(i), counts.get(&ids.value(i)).copied().unwrap_or(0));
            if ids.value(i) == 262 {
                assert_eq!(text.value(i), " the");
            }
            rows += 1;
        }
    }
    assert_eq!(rows, 50257);
    let m = tl.lake().manifest(&a).unwrap().unwrap();
    assert_eq!(m.extra_u64("classes").unwrap(), counts.len() as u64);
    assert_eq!(m.extra_u64("labels").unwrap(), (got.len() * 63) as u64);

    // concat mode drops a single remainder.
    tl.run("pack", &[("dataset", "p"), ("T", "64"), ("mode", "concat")]);
    let cat: Vec<u32> = docs.concat();
    let got = read_chunks(&tl, "p", "train");
    assert_eq!(got.len(), cat.len() / 64);
    assert_eq!(got.concat(), cat[..cat.len() / 64 * 64].to_vec());
}

#[test]
fn tabular_corpora_give_the_same_documents() {
    let tl = TestLake::new();
    let texts = [
        "First story.\n\nWith a blank line.",
        "  Second, with \"quotes\", commas and é.",
        "",
    ];
    // JSON Lines with extra fields.
    let jsonl: String = texts
        .iter()
        .enumerate()
        .map(|(i, t)| serde_json::json!({"id": i, "text": t}).to_string() + "\n")
        .collect();
    let jsonl = tl.file("c.jsonl", jsonl.as_bytes());
    // CSV with the text in the second column.
    let mut csv = String::from("id,text,other\n");
    for (i, t) in texts.iter().enumerate() {
        csv.push_str(&format!("{i},\"{}\",x\n", t.replace('"', "\"\"")));
    }
    let csv = tl.file("c.csv", csv.as_bytes());
    // Parquet as Hugging Face exports it.
    let schema = Arc::new(Schema::new(vec![Field::new("text", DataType::Utf8, true)]));
    let batch =
        RecordBatch::try_new(schema.clone(), vec![Arc::new(StringArray::from(texts.to_vec()))]).unwrap();
    let mut buf = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let pq = tl.file("c.parquet", &buf);
    for (name, file) in [("j", &jsonl), ("c", &csv), ("q", &pq)] {
        tl.run("ingest", &[("dataset", name), ("train", file)]);
        let a = Artifact::new("documents", &[("dataset", name), ("split", "train")]).unwrap();
        let b = &tl.lake().read_artifact(&a).unwrap()[0];
        let got: Vec<&str> = (0..b.num_rows())
            .map(|i| b.column(3).as_string::<i32>().value(i))
            .collect();
        assert_eq!(got, texts.to_vec(), "{name}");
    }
    // A missing column is named, with the ones that exist.
    let err = tl.run_err(
        "ingest",
        &[("dataset", "x"), ("train", &csv), ("text_column", "story")],
    );
    assert!(
        err.contains("no column 'story'") && err.contains("id, text, other"),
        "{err}"
    );
    let err = tl.run_err(
        "ingest",
        &[("dataset", "x"), ("train", &pq), ("text_column", "story")],
    );
    assert!(err.contains("no column 'story'"), "{err}");
    let err = tl.run_err(
        "ingest",
        &[("dataset", "x"), ("train", &jsonl), ("text_column", "story")],
    );
    assert!(err.contains("no 'story' field"), "{err}");
    let nulls = tl.file("n.jsonl", b"{\"text\": \"a\"}\n{\"text\": null}\n");
    let err = tl.run_err("ingest", &[("dataset", "x"), ("train", &nulls)]);
    assert!(err.contains("row 1") && err.contains("null"), "{err}");
}

#[test]
fn bad_inputs_are_refused_with_a_clear_error_and_nothing_written() {
    let tl = TestLake::new();
    let bad = tl.file("bad.txt", b"fine story\n<|endoftext|>\nbroken \xc3\x28 here\n");
    let err = tl.run_err("ingest", &[("dataset", "b"), ("train", &bad)]);
    assert!(
        err.contains("bad.txt") && err.contains("invalid UTF-8 at byte offset 32"),
        "{err}"
    );
    let empty = tl.file("empty.txt", b"");
    let err = tl.run_err("ingest", &[("dataset", "b"), ("train", &empty)]);
    assert!(err.contains("no documents"), "{err}");
    let err = tl.run_err("ingest", &[("dataset", "b"), ("train", "/nonexistent/x.txt")]);
    assert!(
        err.contains("/nonexistent/x.txt") && err.contains("no such file"),
        "{err}"
    );
    assert!(
        tl.lake().list("documents").unwrap().is_empty(),
        "a failed ingest left files behind"
    );

    let good = tl.file(
        "good.txt",
        first_stories(&data("tinystories_val_sample.txt"), 5).as_bytes(),
    );
    tl.run("ingest", &[("dataset", "b"), ("train", &good)]);
    let junk = tl.file("tok.json", b"{\"not\": \"a tokenizer\"}");
    let err = tl.run_err("tokenize", &[("dataset", "b"), ("tokenizer", &junk)]);
    assert!(
        err.contains("tok.json") && err.contains("not a valid tokenizer.json"),
        "{err}"
    );
    assert!(tl.lake().list("tokens").unwrap().is_empty());
    tl.run(
        "tokenize",
        &[("dataset", "b"), ("tokenizer", &data("tokenizer.json"))],
    );
    let err = tl.run_err("pack", &[("dataset", "b"), ("T", "1")]);
    assert!(
        err.contains("parameter T") && err.contains("at least 2 tokens"),
        "{err}"
    );
    let err = tl.run_err("pack", &[("dataset", "b"), ("T", "100000")]);
    assert!(err.contains("no chunk of 100000 tokens"), "{err}");
    assert!(tl.lake().list("chunks").unwrap().is_empty());
    let err = tl.run_err(
        "tokenize",
        &[("dataset", "nope"), ("tokenizer", &data("tokenizer.json"))],
    );
    assert!(
        err.contains("documents/dataset=nope/split=train") && err.contains("stage=ingest"),
        "{err}"
    );
}

#[test]
fn seeded_holdout_is_reproducible() {
    let tl = TestLake::new();
    let src = data("tinystories_train_sample.txt");
    // The byte offsets of the documents sent to validation.
    let held_out = |ds: &str, seed: &str| -> (u64, Vec<u64>) {
        tl.run(
            "ingest",
            &[
                ("dataset", ds),
                ("input", &src),
                ("holdout", "0.25"),
                ("seed", seed),
            ],
        );
        let rows = |s: &str| {
            let a = Artifact::new("documents", &[("dataset", ds), ("split", s)]).unwrap();
            tl.lake().read_artifact(&a).unwrap()
        };
        let train: u64 = rows("train").iter().map(|b| b.num_rows() as u64).sum();
        let val: Vec<u64> = rows("validation")
            .iter()
            .flat_map(|b| b.column(2).as_primitive::<UInt64Type>().values().to_vec())
            .collect();
        (train, val)
    };
    let a = held_out("h1", "7");
    assert_eq!(a, held_out("h2", "7"));
    assert_eq!(a.0 + a.1.len() as u64, 600);
    // Binomial(600, 0.25): sd ~ 10.6; allow 4 sd.
    assert!((a.1.len() as i64 - 150).abs() < 43, "{}", a.1.len());
    assert_ne!(a.1, held_out("h3", "8").1);
}
