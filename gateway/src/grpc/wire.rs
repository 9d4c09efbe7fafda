//! tonic's prost codec with each request checked on the wire first. prost
//! allocates per repeated entry: an empty `inputs` entry is 2 bytes on the
//! wire and about 300 once decoded, so a 32 MiB `ModelInferRequest` could
//! decode to gigabytes before any handler runs. The check walks the wire
//! format (no allocation) and refuses more entries than a request can use;
//! the limits are far above what a real request sends.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

use super::pb;

/// Tensors (`inputs`, `outputs`, `raw_input_contents`) in one request.
const MAX_TENSORS: usize = 16;
/// Entries of one `parameters` map.
const MAX_PARAMETERS: usize = 64;
/// Dimensions of one shape.
const MAX_DIMS: usize = 16;
/// Elements of one `bytes_contents` (encoded images, a few per request).
const MAX_BYTES_ELEMENTS: usize = 4096;

/// A request type's wire check; all but `ModelInferRequest` are at most
/// [`crate::body::SMALL_BODY_BYTES`] and have no repeated messages worth
/// checking.
pub trait Checked {
    fn check(_wire: &[u8]) -> Result<(), String> {
        Ok(())
    }
}

macro_rules! unchecked {
    ($($t:ident),*) => { $(impl Checked for pb::$t {})* };
}

unchecked!(
    ServerLiveRequest,
    ServerReadyRequest,
    ModelReadyRequest,
    ServerMetadataRequest,
    ModelMetadataRequest,
    ModelConfigRequest,
    ModelStatisticsRequest,
    RepositoryIndexRequest,
    RepositoryModelLoadRequest,
    RepositoryModelUnloadRequest,
    SystemSharedMemoryStatusRequest,
    SystemSharedMemoryRegisterRequest,
    SystemSharedMemoryUnregisterRequest,
    CudaSharedMemoryStatusRequest,
    CudaSharedMemoryRegisterRequest,
    CudaSharedMemoryUnregisterRequest,
    TraceSettingRequest,
    LogSettingsRequest
);

impl Checked for pb::ModelInferRequest {
    fn check(wire: &[u8]) -> Result<(), String> {
        let mut n = Counts::default();
        fields(wire, |tag, payload| match tag {
            4 => n.add("parameters", MAX_PARAMETERS),
            5 => {
                n.add("inputs", MAX_TENSORS)?;
                input(message(payload)?)
            }
            6 => {
                n.add("outputs", MAX_TENSORS)?;
                output(message(payload)?)
            }
            7 => n.add("raw_input_contents", MAX_TENSORS),
            _ => Ok(()),
        })
    }
}

fn input(wire: &[u8]) -> Result<(), String> {
    let mut n = Counts::default();
    fields(wire, |tag, payload| match tag {
        // Packed (one payload of varints) or one varint per entry.
        3 => match payload {
            Some(p) => n.add_many(
                "shape",
                p.iter().filter(|b| *b & 0x80 == 0).count(),
                MAX_DIMS,
            ),
            None => n.add("shape", MAX_DIMS),
        },
        4 => n.add("parameters", MAX_PARAMETERS),
        5 => contents(message(payload)?),
        _ => Ok(()),
    })
}

fn output(wire: &[u8]) -> Result<(), String> {
    let mut n = Counts::default();
    fields(wire, |tag, _| match tag {
        2 => n.add("parameters", MAX_PARAMETERS),
        _ => Ok(()),
    })
}

/// Typed contents: FP32 (4 bytes each, on the wire as in memory) and
/// BYTES only, the two datatypes mmgate serves.
fn contents(wire: &[u8]) -> Result<(), String> {
    let mut n = Counts::default();
    fields(wire, |tag, _| match tag {
        6 => Ok(()),
        8 => n.add("bytes_contents", MAX_BYTES_ELEMENTS),
        _ => Err("only fp32_contents and bytes_contents are served".into()),
    })
}

/// Occurrences of repeated fields, each under its limit.
#[derive(Default)]
struct Counts(Vec<(&'static str, usize)>);

impl Counts {
    fn add(&mut self, what: &'static str, max: usize) -> Result<(), String> {
        self.add_many(what, 1, max)
    }

    fn add_many(&mut self, what: &'static str, k: usize, max: usize) -> Result<(), String> {
        let i = match self.0.iter().position(|(w, _)| *w == what) {
            Some(i) => i,
            None => {
                self.0.push((what, 0));
                self.0.len() - 1
            }
        };
        self.0[i].1 += k;
        if self.0[i].1 > max {
            return Err(format!("more than {max} {what}"));
        }
        Ok(())
    }
}

/// A nested message's bytes (a length-delimited field).
fn message(payload: Option<&[u8]>) -> Result<&[u8], String> {
    payload.ok_or_else(|| "a message field of the wrong wire type".into())
}

/// Walks the fields of one message: `f(tag, payload)` for each, with the
/// payload of a length-delimited field.
fn fields(
    mut wire: &[u8],
    mut f: impl FnMut(u32, Option<&[u8]>) -> Result<(), String>,
) -> Result<(), String> {
    use prost::encoding::decode_varint;
    let bad = |e: prost::DecodeError| e.to_string();
    while !wire.is_empty() {
        let key = decode_varint(&mut wire).map_err(bad)?;
        let tag = (key >> 3) as u32;
        let payload = match key & 7 {
            0 => {
                decode_varint(&mut wire).map_err(bad)?;
                None
            }
            1 | 5 => {
                let n = if key & 7 == 1 { 8 } else { 4 };
                wire = wire.get(n..).ok_or("a field runs past the message")?;
                None
            }
            2 => {
                let len = decode_varint(&mut wire).map_err(bad)? as usize;
                let p = wire.get(..len).ok_or("a field runs past the message")?;
                wire = &wire[len..];
                Some(p)
            }
            _ => return Err("an unsupported wire type".into()),
        };
        f(tag, payload)?;
    }
    Ok(())
}

/// [`ProstCodec`] whose decoder checks each request first.
#[derive(Debug, Clone)]
pub struct BoundedCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for BoundedCodec<T, U> {
    fn default() -> Self {
        Self(ProstCodec::default())
    }
}

impl<T, U> Codec for BoundedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Checked + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = CheckedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        CheckedDecoder(self.0.decoder(), PhantomData)
    }
}

#[derive(Debug)]
pub struct CheckedDecoder<U>(ProstDecoder<U>, PhantomData<U>);

impl<U: Message + Default + Checked> Decoder for CheckedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        use bytes::Buf as _;
        // tonic hands over the whole message, contiguous.
        if buf.chunk().len() == buf.remaining() {
            U::check(buf.chunk()).map_err(|e| {
                Status::invalid_argument(format!("the message was refused before decoding: {e}"))
            })?;
        }
        self.0.decode(buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_real_request_passes_and_padding_with_empty_entries_does_not() {
        let input = pb::model_infer_request::InferInputTensor {
            name: "input:0".into(),
            datatype: "BYTES".into(),
            shape: vec![2],
            contents: Some(pb::InferTensorContents {
                bytes_contents: vec![b"jpeg".to_vec(), b"png".to_vec()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let req = pb::ModelInferRequest {
            model_name: "open_nsfw".into(),
            inputs: vec![input.clone()],
            outputs: vec![Default::default(); 2],
            ..Default::default()
        };
        pb::ModelInferRequest::check(&req.encode_to_vec()).unwrap();
        let many = pb::ModelInferRequest {
            inputs: vec![Default::default(); MAX_TENSORS + 1],
            ..Default::default()
        };
        let e = pb::ModelInferRequest::check(&many.encode_to_vec()).unwrap_err();
        assert!(e.contains("inputs"), "{e}");
        let dims = pb::ModelInferRequest {
            inputs: vec![pb::model_infer_request::InferInputTensor {
                shape: vec![1; MAX_DIMS + 1],
                ..Default::default()
            }],
            ..Default::default()
        };
        let e = pb::ModelInferRequest::check(&dims.encode_to_vec()).unwrap_err();
        assert!(e.contains("shape"), "{e}");
        let int64 = pb::ModelInferRequest {
            inputs: vec![pb::model_infer_request::InferInputTensor {
                contents: Some(pb::InferTensorContents {
                    int64_contents: vec![1; 10],
                    ..Default::default()
                }),
                ..input
            }],
            ..Default::default()
        };
        assert!(pb::ModelInferRequest::check(&int64.encode_to_vec()).is_err());
        // An `inputs` entry that claims 16 bytes and has 1: refused, not
        // read past.
        assert!(pb::ModelInferRequest::check(&[0x2A, 0x10, 0x00]).is_err());
    }
}
