//! Reads the parts of an ONNX model (`onnx.proto3`, protobuf wire format) that importing weights
//! needs: the graph's nodes (op type, inputs, outputs, attributes), its initializers (tensors)
//! and its input shapes. It runs nothing. Families map initializers to checkpoint names by
//! walking the graph: torch.onnx keeps module names on parameters it leaves alone, but gives a
//! transposed `MatMul` weight or a constant-folded slice an anonymous name (`onnx::MatMul_1966`).
//!
//! Every length and offset is checked against the file: a corrupt file is an error naming it,
//! never a panic.

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// One tensor of the file (an initializer, or a `Constant` node's value).
#[derive(Debug, Clone)]
pub struct OnnxTensor {
    pub name: String,
    pub dims: Vec<i64>,
    /// `TensorProto.DataType`: 1 float, 7 int64, 10 float16, 16 bfloat16, …
    pub data_type: i32,
    raw: Vec<u8>,
    floats: Vec<f32>,
    int64s: Vec<i64>,
    external: bool,
}

/// One attribute of a node; only the kinds weight import reads.
#[derive(Debug, Clone, Default)]
pub struct Attribute {
    pub name: String,
    pub float: Option<f32>,
    pub int: Option<i64>,
    pub tensor: Option<OnnxTensor>,
}

#[derive(Debug, Clone, Default)]
pub struct Node {
    pub name: String,
    pub op_type: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attributes: Vec<Attribute>,
}

/// A graph input: its name and dims (`None` for a symbolic dimension such as `batch_size`).
#[derive(Debug, Clone, Default)]
pub struct ValueInfo {
    pub name: String,
    pub dims: Vec<Option<i64>>,
}

/// The graph of an ONNX model, with lookups by value name.
#[derive(Debug)]
pub struct OnnxGraph {
    pub file: PathBuf,
    pub nodes: Vec<Node>,
    pub initializers: HashMap<String, OnnxTensor>,
    pub inputs: Vec<ValueInfo>,
    /// Value name → index of the node producing it.
    producers: HashMap<String, usize>,
    /// Value name → indices of the nodes reading it.
    consumers: HashMap<String, Vec<usize>>,
}

// ---- protobuf wire format -------------------------------------------------------------------

/// A cursor over one message's bytes.
struct Wire<'a> {
    bytes: &'a [u8],
    pos: usize,
}

/// A field's value as the wire carries it.
enum Value<'a> {
    Varint(u64),
    /// Skipped: no field weight import reads is a double or a fixed64.
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

impl<'a> Wire<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Wire { bytes, pos: 0 }
    }

    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self
                .bytes
                .get(self.pos)
                .ok_or("truncated varint at the end of a message")?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                format!(
                    "field of {n} bytes at offset {} runs past its message ({} bytes)",
                    self.pos,
                    self.bytes.len()
                )
            })?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    /// The next `(field number, value)`, or `None` at the end.
    fn field(&mut self) -> std::result::Result<Option<(u64, Value<'a>)>, String> {
        if self.pos >= self.bytes.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let n = usize::try_from(self.varint()?).map_err(|_| "length overflows")?;
                Value::Bytes(self.take(n)?)
            }
            5 => Value::Fixed32(u32::from_le_bytes(
                self.take(4)?.try_into().expect("took 4 bytes"),
            )),
            other => return Err(format!("unsupported protobuf wire type {other}")),
        };
        Ok(Some((key >> 3, value)))
    }
}

fn string(value: Value<'_>) -> std::result::Result<String, String> {
    match value {
        Value::Bytes(b) => String::from_utf8(b.to_vec()).map_err(|_| "a name is not UTF-8".into()),
        _ => Err("expected a string field".into()),
    }
}

fn message(value: Value<'_>) -> std::result::Result<&[u8], String> {
    match value {
        Value::Bytes(b) => Ok(b),
        _ => Err("expected an embedded message".into()),
    }
}

/// Appends a repeated varint field, packed or not.
fn varints(value: Value<'_>, out: &mut Vec<i64>) -> std::result::Result<(), String> {
    match value {
        Value::Varint(v) => out.push(v as i64),
        Value::Bytes(b) => {
            let mut w = Wire::new(b);
            while w.pos < b.len() {
                out.push(w.varint()? as i64);
            }
        }
        _ => return Err("expected integers".into()),
    }
    Ok(())
}

fn parse_tensor(bytes: &[u8]) -> std::result::Result<OnnxTensor, String> {
    let mut t = OnnxTensor {
        name: String::new(),
        dims: Vec::new(),
        data_type: 0,
        raw: Vec::new(),
        floats: Vec::new(),
        int64s: Vec::new(),
        external: false,
    };
    let mut w = Wire::new(bytes);
    while let Some((field, value)) = w.field()? {
        match (field, value) {
            (1, v) => varints(v, &mut t.dims)?,
            (2, Value::Varint(v)) => t.data_type = v as i32,
            (4, Value::Fixed32(v)) => t.floats.push(f32::from_bits(v)),
            (4, Value::Bytes(b)) => {
                if b.len() % 4 != 0 {
                    return Err("packed float_data is not a whole number of floats".into());
                }
                t.floats.extend(
                    b.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                );
            }
            (7, v) => varints(v, &mut t.int64s)?,
            (8, v) => t.name = string(v)?,
            (9, Value::Bytes(b)) => t.raw = b.to_vec(),
            (14, Value::Varint(v)) => t.external = v == 1,
            _ => {}
        }
    }
    Ok(t)
}

fn parse_attribute(bytes: &[u8]) -> std::result::Result<Attribute, String> {
    let mut a = Attribute::default();
    let mut w = Wire::new(bytes);
    while let Some((field, value)) = w.field()? {
        match (field, value) {
            (1, v) => a.name = string(v)?,
            (2, Value::Fixed32(v)) => a.float = Some(f32::from_bits(v)),
            (3, Value::Varint(v)) => a.int = Some(v as i64),
            (5, v) => a.tensor = Some(parse_tensor(message(v)?)?),
            _ => {}
        }
    }
    Ok(a)
}

fn parse_node(bytes: &[u8]) -> std::result::Result<Node, String> {
    let mut n = Node::default();
    let mut w = Wire::new(bytes);
    while let Some((field, value)) = w.field()? {
        match field {
            1 => n.inputs.push(string(value)?),
            2 => n.outputs.push(string(value)?),
            3 => n.name = string(value)?,
            4 => n.op_type = string(value)?,
            5 => n.attributes.push(parse_attribute(message(value)?)?),
            _ => {}
        }
    }
    Ok(n)
}

/// `ValueInfoProto` → name and the dims of its tensor type.
fn parse_value_info(bytes: &[u8]) -> std::result::Result<ValueInfo, String> {
    let mut info = ValueInfo::default();
    let mut w = Wire::new(bytes);
    while let Some((field, value)) = w.field()? {
        match field {
            1 => info.name = string(value)?,
            // TypeProto.tensor_type (1) → Tensor.shape (2) → TensorShapeProto.dim (1, repeated)
            // → Dimension.dim_value (1) or dim_param (2).
            2 => {
                let mut ty = Wire::new(message(value)?);
                while let Some((1, tensor_type)) = ty.field()? {
                    let mut tt = Wire::new(message(tensor_type)?);
                    while let Some((f, shape)) = tt.field()? {
                        if f != 2 {
                            continue;
                        }
                        let mut s = Wire::new(message(shape)?);
                        while let Some((1, dim)) = s.field()? {
                            let mut d = Wire::new(message(dim)?);
                            let mut size = None;
                            while let Some((f, v)) = d.field()? {
                                if let (1, Value::Varint(v)) = (f, v) {
                                    size = Some(v as i64);
                                }
                            }
                            info.dims.push(size);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(info)
}

impl OnnxGraph {
    /// Parses the ONNX file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&bytes, path)
    }

    /// Parses ONNX `bytes`; `file` names them in errors.
    pub fn parse(bytes: &[u8], file: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Data {
            file: file.to_path_buf(),
            reason: format!("not a readable ONNX model: {reason}"),
        };
        let mut graph_bytes = None;
        let mut w = Wire::new(bytes);
        while let Some((field, value)) = w.field().map_err(bad)? {
            if field == 7 {
                graph_bytes = Some(message(value).map_err(bad)?);
            }
        }
        let graph_bytes = graph_bytes.ok_or_else(|| bad("the model holds no graph".into()))?;
        let mut graph = OnnxGraph {
            file: file.to_path_buf(),
            nodes: Vec::new(),
            initializers: HashMap::new(),
            inputs: Vec::new(),
            producers: HashMap::new(),
            consumers: HashMap::new(),
        };
        let mut w = Wire::new(graph_bytes);
        while let Some((field, value)) = w.field().map_err(bad)? {
            match field {
                1 => graph
                    .nodes
                    .push(parse_node(message(value).map_err(bad)?).map_err(bad)?),
                5 => {
                    let t = parse_tensor(message(value).map_err(bad)?).map_err(bad)?;
                    graph.initializers.insert(t.name.clone(), t);
                }
                11 => graph
                    .inputs
                    .push(parse_value_info(message(value).map_err(bad)?).map_err(bad)?),
                _ => {}
            }
        }
        for (i, node) in graph.nodes.iter().enumerate() {
            for out in &node.outputs {
                graph.producers.insert(out.clone(), i);
            }
            for input in &node.inputs {
                graph.consumers.entry(input.clone()).or_default().push(i);
            }
        }
        Ok(graph)
    }

    /// The node producing value `name`.
    pub fn producer(&self, name: &str) -> Option<&Node> {
        self.producers.get(name).map(|&i| &self.nodes[i])
    }

    /// The nodes reading value `name`.
    pub fn consumers(&self, name: &str) -> impl Iterator<Item = &Node> {
        self.consumers
            .get(name)
            .into_iter()
            .flatten()
            .map(|&i| &self.nodes[i])
    }

    /// The scalar a `Constant` node (or an initializer) gives value `name`, as f64.
    pub fn scalar(&self, name: &str) -> Option<f64> {
        let tensor = match self.initializers.get(name) {
            Some(t) => t.clone(),
            None => {
                let node = self.producer(name).filter(|n| n.op_type == "Constant")?;
                node.attributes.iter().find_map(|a| a.tensor.clone())?
            }
        };
        let values = tensor.to_tensor(&self.file).ok()?;
        (values.numel() == 1).then(|| values.to_kind(Kind::Double).double_value(&[]))
    }

    /// Initializer `name` as a CPU tensor.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        self.initializers
            .get(name)
            .ok_or_else(|| Error::MissingTensor {
                file: self.file.clone(),
                name: name.to_string(),
            })?
            .to_tensor(&self.file)
    }
}

impl OnnxTensor {
    /// The tensor on the CPU: float types as they are stored, int64 as i64.
    pub fn to_tensor(&self, file: &Path) -> Result<Tensor> {
        let bad = |reason: String| Error::Data {
            file: file.to_path_buf(),
            reason: format!("initializer `{}`: {reason}", self.name),
        };
        if self.external {
            return Err(bad(
                "its data lives in an external file, which is not supported; re-export with the weights inside the .onnx".into(),
            ));
        }
        if self.dims.iter().any(|&d| d < 0) {
            return Err(bad(format!("negative dims {:?}", self.dims)));
        }
        let count = self
            .dims
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize))
            .ok_or_else(|| bad(format!("dims {:?} overflow", self.dims)))?;
        let (kind, width) = match self.data_type {
            1 => (Kind::Float, 4),
            7 => (Kind::Int64, 8),
            10 => (Kind::Half, 2),
            16 => (Kind::BFloat16, 2),
            other => {
                return Err(bad(format!(
                    "data type {other} is not supported (float, float16, bfloat16, int64 are)"
                )))
            }
        };
        let flat = if !self.raw.is_empty() || (self.floats.is_empty() && self.int64s.is_empty()) {
            if count.checked_mul(width) != Some(self.raw.len()) {
                return Err(bad(format!(
                    "dims {:?} need {count} values of {width} bytes, raw_data holds {} bytes",
                    self.dims,
                    self.raw.len()
                )));
            }
            Tensor::from_data_size(&self.raw, &[count as i64], kind)
        } else if kind == Kind::Float && self.floats.len() == count {
            Tensor::from_slice(&self.floats)
        } else if kind == Kind::Int64 && self.int64s.len() == count {
            Tensor::from_slice(&self.int64s)
        } else {
            return Err(bad(format!(
                "dims {:?} do not match its {} typed values",
                self.dims,
                self.floats.len().max(self.int64s.len())
            )));
        };
        Ok(flat.reshape(self.dims.as_slice()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Protobuf encoding helpers for hand-built models.
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    fn field_bytes(field: u64, bytes: &[u8], out: &mut Vec<u8>) {
        varint(field << 3 | 2, out);
        varint(bytes.len() as u64, out);
        out.extend_from_slice(bytes);
    }

    #[test]
    fn reads_an_initializer_and_a_node_of_a_hand_encoded_model() {
        let mut tensor = Vec::new();
        varint(1 << 3, &mut tensor);
        varint(2, &mut tensor);
        varint(1 << 3, &mut tensor);
        varint(3, &mut tensor);
        varint(2 << 3, &mut tensor);
        varint(1, &mut tensor);
        field_bytes(8, b"w", &mut tensor);
        let data: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        field_bytes(9, &data, &mut tensor);
        let mut node = Vec::new();
        field_bytes(1, b"x", &mut node);
        field_bytes(1, b"w", &mut node);
        field_bytes(2, b"y", &mut node);
        field_bytes(4, b"MatMul", &mut node);
        let mut graph = Vec::new();
        field_bytes(1, &node, &mut graph);
        field_bytes(5, &tensor, &mut graph);
        let mut model = Vec::new();
        field_bytes(7, &graph, &mut model);
        let g = OnnxGraph::parse(&model, Path::new("m.onnx")).unwrap();
        assert_eq!(g.nodes[0].op_type, "MatMul");
        assert_eq!(g.consumers("w").count(), 1);
        assert_eq!(g.producer("y").unwrap().inputs, ["x", "w"]);
        let w = g.tensor("w").unwrap();
        assert_eq!(w.size(), [2, 3]);
        assert_eq!(w.double_value(&[1, 2]), 5.0);
        // Cut anywhere inside, the model is an error, never a panic.
        for cut in 0..model.len() {
            let _ = OnnxGraph::parse(&model[..cut], Path::new("m.onnx"));
        }
        let err = OnnxGraph::parse(&model[..model.len() - 3], Path::new("m.onnx")).unwrap_err();
        assert!(err.to_string().contains("m.onnx"), "{err}");
    }
}
