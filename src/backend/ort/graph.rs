//! One edit of a decoder graph at load, made on the protobuf wire so that every field this crate
//! has no message for passes through untouched: the LM head reads only the positions whose
//! logits are wanted.
//!
//! A decoder graph computes logits for every position of a chunk, `[1, n, n_vocab]`, though
//! generation reads only the last: on SmolLM2 the head is a fifth of the weights, so a 128-token
//! prompt spends a fifth of its time, and 25 MB of output, on logits nobody reads. The edit puts
//! `Slice(hidden, starts = logits_from, axis −2)` before the head, with `logits_from` a new graph
//! input: the forward call passes `n − 1` when it wants the last position, `0` when it wants all
//! (perplexity). The weights are not touched; the edited graph is loaded from memory with its
//! external data handed over by file name.
//!
//! Any doubt ends the edit and the file is loaded as it is: a graph field of a wire type this
//! reader does not expect, no single node producing the logits, a head that is not a
//! `MatMul`/`MatMulNBits`, or a head node that does not re-encode to its own bytes (a field the
//! messages in [`super::onnx`] do not know).

use prost::encoding::{decode_varint, encode_key, encode_varint, WireType};
use prost::Message;

use super::onnx::{dtype, node, value_info, NodeProto, TensorProto};

/// The graph input that says from which position of the chunk logits are computed.
pub const LOGITS_FROM: &str = "edgellm/logits_from";
const HIDDEN: &str = "edgellm/logits_hidden";
const END: &str = "edgellm/logits_end";
const AXIS: &str = "edgellm/logits_axis";

// ModelProto.graph, GraphProto.{node, initializer, input}.
const MODEL_GRAPH: u32 = 7;
const GRAPH_NODE: u32 = 1;
const GRAPH_INITIALIZER: u32 = 5;
const GRAPH_INPUT: u32 = 11;

/// One field of a message: its number, and its bytes key included (`raw`) or, for a
/// length-delimited field, the payload alone (`body`).
struct Field<'a> {
    number: u32,
    raw: &'a [u8],
    body: &'a [u8],
}

/// A message's fields in order, or `None` at anything but well-formed varint, 64-bit,
/// length-delimited and 32-bit fields.
fn fields(mut buf: &[u8]) -> Option<Vec<Field<'_>>> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let start = buf;
        let key = decode_varint(&mut buf).ok()?;
        let number = u32::try_from(key >> 3).ok()?;
        let body = match key & 7 {
            0 => {
                decode_varint(&mut buf).ok()?;
                &[][..]
            }
            1 => {
                buf = buf.get(8..)?;
                &[][..]
            }
            2 => {
                let len = usize::try_from(decode_varint(&mut buf).ok()?).ok()?;
                let body = buf.get(..len)?;
                buf = &buf[len..];
                body
            }
            5 => {
                buf = buf.get(4..)?;
                &[][..]
            }
            _ => return None,
        };
        let used = start.len() - buf.len();
        out.push(Field {
            number,
            raw: &start[..used],
            body,
        });
    }
    Some(out)
}

fn put(out: &mut Vec<u8>, number: u32, payload: &[u8]) {
    encode_key(number, WireType::LengthDelimited, out);
    encode_varint(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

fn i64_tensor(name: &str, v: i64) -> TensorProto {
    TensorProto {
        dims: vec![1],
        data_type: dtype::INT64,
        name: name.into(),
        raw_data: v.to_le_bytes().to_vec(),
        ..Default::default()
    }
}

/// `model.onnx`'s bytes with the head reading only positions `logits_from..` of the chunk, or
/// `None` when the graph is not one this edit is sure of (see the module's text).
pub fn last_logits(model: &[u8], logits: &str) -> Option<Vec<u8>> {
    let top = fields(model)?;
    let graphs: Vec<&Field> = top.iter().filter(|f| f.number == MODEL_GRAPH).collect();
    let [graph] = graphs.as_slice() else {
        return None;
    };
    let parts = fields(graph.body)?;
    let mut head = None;
    for (i, f) in parts.iter().enumerate() {
        if f.number != GRAPH_NODE {
            continue;
        }
        let n = NodeProto::decode(f.body).ok()?;
        if n.input
            .iter()
            .chain(&n.output)
            .any(|s| s.starts_with("edgellm/"))
        {
            return None;
        }
        if n.output.iter().any(|o| o == logits) {
            if head.is_some() {
                return None;
            }
            head = Some((i, n));
        }
    }
    let (at, mut n) = head?;
    let matmul = matches!(
        (n.domain.as_str(), n.op_type.as_str()),
        ("" | "ai.onnx", "MatMul") | ("com.microsoft", "MatMulNBits")
    );
    if !matmul || n.output.len() != 1 || n.input.is_empty() || n.encode_to_vec() != parts[at].body {
        return None;
    }
    let hidden = std::mem::replace(&mut n.input[0], HIDDEN.into());
    let slice = node(
        "Slice",
        "",
        "edgellm/logits_slice",
        &[&hidden, LOGITS_FROM, END, AXIS],
        &[HIDDEN],
        vec![],
    );

    let mut g = Vec::with_capacity(graph.body.len() + 256);
    for (i, f) in parts.iter().enumerate() {
        if i == at {
            put(&mut g, GRAPH_NODE, &slice.encode_to_vec());
            put(&mut g, GRAPH_NODE, &n.encode_to_vec());
        } else {
            g.extend_from_slice(f.raw);
        }
    }
    put(
        &mut g,
        GRAPH_INITIALIZER,
        &i64_tensor(END, i64::MAX).encode_to_vec(),
    );
    put(
        &mut g,
        GRAPH_INITIALIZER,
        &i64_tensor(AXIS, -2).encode_to_vec(),
    );
    let input = value_info(LOGITS_FROM, dtype::INT64, &[Ok(1)]);
    put(&mut g, GRAPH_INPUT, &input.encode_to_vec());

    let mut out = Vec::with_capacity(model.len() + 256);
    for f in &top {
        if f.number == MODEL_GRAPH {
            put(&mut out, MODEL_GRAPH, &g);
        } else {
            out.extend_from_slice(f.raw);
        }
    }
    Some(out)
}

/// The external data files the graph's initializers name (`location`), each once; `None` if a
/// location is not a plain file name beside the model (absolute, or with a directory part).
pub fn external_files(model: &[u8]) -> Option<Vec<String>> {
    let top = fields(model)?;
    let graph = top.iter().find(|f| f.number == MODEL_GRAPH)?;
    let mut files: Vec<String> = Vec::new();
    for f in fields(graph.body)? {
        if f.number != GRAPH_INITIALIZER {
            continue;
        }
        let t = TensorProto::decode(f.body).ok()?;
        for e in t.external_data.iter().filter(|e| e.key == "location") {
            let v = &e.value;
            if v.is_empty() || v.contains('/') || v.contains('\\') || v == ".." {
                return None;
            }
            if !files.contains(v) {
                files.push(v.clone());
            }
        }
    }
    Some(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ort::onnx::{GraphProto, ModelProto, OperatorSetIdProto};

    fn model(nodes: Vec<NodeProto>) -> Vec<u8> {
        ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            }],
            graph: Some(GraphProto {
                node: nodes,
                name: "g".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn the_head_reads_the_sliced_hidden_state_and_the_rest_is_kept() {
        let norm = node("Identity", "", "norm", &["h"], &["h_final"], vec![]);
        let head = node("MatMul", "", "head", &["h_final", "w"], &["logits"], vec![]);
        let bytes = model(vec![norm.clone(), head]);
        let edited = last_logits(&bytes, "logits").expect("edit");
        let m = ModelProto::decode(edited.as_slice()).expect("decodes");
        let g = m.graph.expect("graph");
        assert_eq!(m.opset_import.len(), 1);
        assert_eq!(g.node.len(), 3);
        assert_eq!(g.node[0], norm);
        assert_eq!(g.node[1].op_type, "Slice");
        assert_eq!(g.node[1].input, ["h_final", LOGITS_FROM, END, AXIS]);
        assert_eq!(g.node[2].input, [HIDDEN, "w"]);
        assert_eq!(g.node[2].output, ["logits"]);
        assert_eq!(g.input.len(), 1);
        assert_eq!(g.input[0].name, LOGITS_FROM);
        let axis = g.initializer.iter().find(|t| t.name == AXIS).expect("axis");
        assert_eq!(axis.raw_data, (-2i64).to_le_bytes());
    }

    #[test]
    fn graphs_it_is_not_sure_of_are_left_alone() {
        let head = |op: &str| node(op, "", "head", &["h", "w"], &["logits"], vec![]);
        // No node makes the logits; two do; the head is no matrix product.
        assert!(last_logits(&model(vec![head("MatMul")]), "other").is_none());
        assert!(last_logits(&model(vec![head("MatMul"), head("MatMul")]), "logits").is_none());
        assert!(last_logits(&model(vec![head("Gather")]), "logits").is_none());
        // Not protobuf at all.
        assert!(last_logits(&[0xff, 0xff, 0xff], "logits").is_none());
        // A head with a field the messages here do not know (NodeProto field 99) would lose it
        // when written again: no edit.
        let mut bytes = model(vec![]);
        let mut n = head("MatMul").encode_to_vec();
        encode_key(99, WireType::Varint, &mut n);
        encode_varint(1, &mut n);
        let mut g = Vec::new();
        put(&mut g, GRAPH_NODE, &n);
        put(&mut bytes, MODEL_GRAPH, &g);
        assert!(last_logits(&bytes, "logits").is_none());
    }

    #[test]
    fn external_files_are_named_once_and_must_lie_beside_the_model() {
        let with = |locs: &[&str]| {
            let init = locs
                .iter()
                .map(|l| TensorProto {
                    name: format!("t{l}"),
                    data_location: 1,
                    external_data: vec![crate::backend::ort::onnx::StringStringEntryProto {
                        key: "location".into(),
                        value: (*l).into(),
                    }],
                    ..Default::default()
                })
                .collect();
            ModelProto {
                graph: Some(GraphProto {
                    initializer: init,
                    ..Default::default()
                }),
                ..Default::default()
            }
            .encode_to_vec()
        };
        assert_eq!(
            external_files(&with(&["model.onnx.data", "model.onnx.data"])),
            Some(vec!["model.onnx.data".to_string()])
        );
        assert_eq!(external_files(&with(&["../x"])), None);
        assert_eq!(external_files(&with(&["/etc/passwd"])), None);
    }
}
