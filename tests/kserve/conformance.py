"""KServe v2 conformance of a running mmgate, with the official Triton client.

Run by gateway/tests/kserve.rs with:
  HTTP_URL   host:port of the public listener
  GRPC_URL   host:port of the gRPC listener (empty: gRPC not checked)
  MODEL      the model's name
  ALIAS      a route alias of the tenant KEY that MODEL serves (optional)
  JPEG       path of a JPEG; JPEG_SCORES its /v1 scores as JSON {label: value}
  FLAT       path of a solid-colour PNG whose preprocessed tensor is constant;
             FLAT_SCORES its /v1 scores; FLAT_PIXEL the tensor's per-channel
             values as JSON [c0, c1, c2] (the model's channel order)
Prints one line per check; exits 1 on the first failure.
"""
import json
import os
import sys

import numpy as np
import tritonclient.http as httpclient

MODEL = os.environ["MODEL"]
TOL = 1e-5


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        sys.exit(1)


def close(got, want, what):
    got = [float(x) for x in got]
    check(
        len(got) == len(want) and all(abs(a - b) <= TOL for a, b in zip(got, want)),
        f"{what}: {got} vs /v1 {want}",
    )


def main():
    jpeg = open(os.environ["JPEG"], "rb").read()
    flat_png = open(os.environ["FLAT"], "rb").read()
    jpeg_scores = json.loads(os.environ["JPEG_SCORES"])
    flat_scores = json.loads(os.environ["FLAT_SCORES"])
    pixel = json.loads(os.environ["FLAT_PIXEL"])
    http = httpclient.InferenceServerClient(url=os.environ["HTTP_URL"])
    # With KEY set, every call sends a tenant's key (HTTP header or gRPC
    # metadata) and a call without it must be refused.
    key = os.environ.get("KEY", "")
    # A fresh dict each call: tritonclient writes its own headers into it.
    def hdr():
        return {"x-api-key": key} if key else None

    check(http.is_server_live(), "server live")
    check(http.is_server_ready(), "server ready")
    meta = http.get_server_metadata()
    check(meta["name"] == "mmgate" and "binary_tensor_data" in meta["extensions"], f"server metadata {meta}")
    check(http.is_model_ready(MODEL), "model ready")
    m = http.get_model_metadata(MODEL)
    inp = m["inputs"][0]
    check(inp["datatype"] == "FP32" and inp["shape"][0] == -1, f"model metadata {m}")
    labels = [o for o in m["outputs"] if o["name"] == "scores"][0]["shape"][1]
    cfg = http.get_model_config(MODEL)
    check(cfg["max_batch_size"] >= 1 and cfg["input"][0]["dims"] == inp["shape"][1:], f"model config {cfg}")
    check(sorted(jpeg_scores) == sorted(set(jpeg_scores)) and len(jpeg_scores) == labels, f"{labels} labels")

    def rows(result):
        return result.as_numpy("scores")

    # Encoded images as BYTES, binary: one row per element, in order.
    for binary in (True,):
        x = httpclient.InferInput(inp["name"], [2], "BYTES")
        x.set_data_from_numpy(np.array([jpeg, flat_png], dtype=np.object_), binary_data=binary)
        out = [httpclient.InferRequestedOutput("scores", binary_data=True),
               httpclient.InferRequestedOutput("labels", binary_data=False)]
        if key:
            try:
                http.infer(MODEL, [x], outputs=out)
                check(False, "HTTP infer without a key was refused")
            except Exception as e:
                check("missing_api_key" in str(e), f"HTTP infer without a key refused: {e}")
        r = http.infer(MODEL, [x], outputs=out, request_id="bytes-1", headers=hdr())
        s = rows(r)
        check(s.shape == (2, labels), f"BYTES scores shape {s.shape}")
        # The columns' labels, in the model's order.
        order = [n.decode() if isinstance(n, bytes) else n for n in r.as_numpy("labels")[0]]
        check(sorted(order) == sorted(jpeg_scores), f"labels {order}")
        close(s[0], [jpeg_scores[k] for k in order], "BYTES jpeg")
        close(s[1], [flat_scores[k] for k in order], "BYTES png")
        check(r.get_response()["id"] == "bytes-1", "id echoed")

    # A raw tensor, binary and JSON: the flat image's preprocessed tensor.
    shape = [1] + inp["shape"][1:]
    tensor = np.empty(shape, dtype=np.float32)
    channels_last = cfg["input"][0].get("format") != "FORMAT_NCHW"
    for c in range(3):
        if channels_last:
            tensor[..., c] = pixel[c]
        else:
            tensor[:, c] = pixel[c]
    for binary in (True, False):
        x = httpclient.InferInput(inp["name"], shape, "FP32")
        x.set_data_from_numpy(tensor, binary_data=binary)
        r = http.infer(MODEL, [x], outputs=[httpclient.InferRequestedOutput("scores", binary_data=binary)], headers=hdr())
        close(rows(r)[0], [flat_scores[k] for k in order], f"FP32 {'binary' if binary else 'JSON'}")

    # N > 1 raw samples are split across slots and answered in order.
    batch = np.concatenate([tensor, np.zeros_like(tensor), tensor])
    x = httpclient.InferInput(inp["name"], list(batch.shape), "FP32")
    x.set_data_from_numpy(batch, binary_data=True)
    s = rows(http.infer(MODEL, [x], headers=hdr()))
    check(s.shape == (3, labels), f"FP32 batch shape {s.shape}")
    close(s[0], [flat_scores[k] for k in order], "FP32 batch row 1")
    close(s[2], [flat_scores[k] for k in order], "FP32 batch row 3")

    if os.environ.get("SHM") == "1":
        shm_checks(http, inp["name"], shape, tensor, [flat_scores[k] for k in order], labels, hdr)

    grpc_url = os.environ.get("GRPC_URL", "")
    if grpc_url:
        import tritonclient.grpc as grpcclient

        g = grpcclient.InferenceServerClient(url=grpc_url)
        check(g.is_server_live() and g.is_server_ready(), "gRPC server live and ready")
        check(g.get_server_metadata().name == "mmgate", "gRPC server metadata")
        check(g.is_model_ready(MODEL), "gRPC model ready")
        gm = g.get_model_metadata(MODEL)
        check(gm.inputs[0].datatype == "FP32" and list(gm.inputs[0].shape)[0] == -1, "gRPC model metadata")
        gc = g.get_model_config(MODEL)
        check(gc.config.max_batch_size >= 1, "gRPC model config")
        x = grpcclient.InferInput(inp["name"], shape, "FP32")
        x.set_data_from_numpy(tensor)
        if key:
            try:
                g.infer(MODEL, [x])
                check(False, "gRPC infer without a key was refused")
            except Exception as e:
                check("UNAUTHENTICATED" in str(e) or "missing_api_key" in str(e), f"gRPC infer without a key refused: {e}")
        r = g.infer(MODEL, [x], outputs=[grpcclient.InferRequestedOutput("scores")], request_id="g-1", headers=hdr())
        close(r.as_numpy("scores")[0], [flat_scores[k] for k in order], "gRPC FP32 raw")
        check(r.get_response().id == "g-1", "gRPC id echoed")
        pair = np.concatenate([tensor, tensor])
        x = grpcclient.InferInput(inp["name"], list(pair.shape), "FP32")
        x.set_data_from_numpy(pair)
        r = g.infer(MODEL, [x], outputs=[grpcclient.InferRequestedOutput("scores")], headers=hdr())
        s = r.as_numpy("scores")
        check(s.shape == (2, labels), f"gRPC FP32 raw batch shape {s.shape}")
        close(s[1], [flat_scores[k] for k in order], "gRPC FP32 raw batch row 2")
        x = grpcclient.InferInput(inp["name"], [1], "BYTES")
        x.set_data_from_numpy(np.array([jpeg], dtype=np.object_))
        r = g.infer(MODEL, [x], outputs=[grpcclient.InferRequestedOutput("scores"),
                                         grpcclient.InferRequestedOutput("labels")], headers=hdr())
        close(r.as_numpy("scores")[0], [jpeg_scores[k] for k in order], "gRPC BYTES jpeg")

        if os.environ.get("SHM") == "1":
            shm_checks(g, inp["name"], shape, tensor, [flat_scores[k] for k in order], labels, hdr, grpc=True)

    # A tenant's route alias is called like a model; the answer names the
    # model that served.
    alias = os.environ.get("ALIAS", "")
    if alias:
        x = httpclient.InferInput(inp["name"], shape, "FP32")
        x.set_data_from_numpy(tensor, binary_data=True)
        r = http.infer(alias, [x], headers=hdr())
        check(r.get_response()["model_name"] == MODEL, f"HTTP alias {alias} served by {MODEL}")
        close(r.as_numpy("scores")[0], [flat_scores[k] for k in order], "HTTP alias infer")
        if grpc_url:
            x = grpcclient.InferInput(inp["name"], shape, "FP32")
            x.set_data_from_numpy(tensor)
            r = g.infer(alias, [x], headers=hdr())
            check(r.get_response().model_name == MODEL, f"gRPC alias {alias} served by {MODEL}")
            close(r.as_numpy("scores")[0], [flat_scores[k] for k in order], "gRPC alias infer")

    print("conformance: all checks passed")


def shm_checks(client, name, shape, tensor, want, labels, hdr, grpc=False):
    """The system shared-memory extension: the input tensor and the scores
    output pass through /dev/shm regions the client registered."""
    import tritonclient.utils.shared_memory as shm

    mod = __import__("tritonclient.grpc" if grpc else "tritonclient.http", fromlist=["x"])
    tag = "gRPC" if grpc else "HTTP"
    nbytes = tensor.nbytes
    out_bytes = 4 * labels
    ip = shm.create_shared_memory_region("mmgate_in", "/mmgate_in_" + tag, nbytes)
    op = shm.create_shared_memory_region("mmgate_out", "/mmgate_out_" + tag, out_bytes)
    try:
        shm.set_shared_memory_region(ip, [tensor])
        client.register_system_shared_memory("in", "/mmgate_in_" + tag, nbytes, headers=hdr())
        client.register_system_shared_memory("out", "/mmgate_out_" + tag, out_bytes, headers=hdr())
        status = client.get_system_shared_memory_status(headers=hdr())
        check("in" in str(status) and "out" in str(status), f"{tag} shared-memory status")
        x = mod.InferInput(name, shape, "FP32")
        x.set_shared_memory("in", nbytes)
        o = mod.InferRequestedOutput("scores")
        o.set_shared_memory("out", out_bytes)
        client.infer(MODEL, [x], outputs=[o], headers=hdr())
        got = shm.get_contents_as_numpy(op, np.float32, [1, labels])
        close(got[0], want, f"{tag} shared-memory infer")
        client.unregister_system_shared_memory(headers=hdr())
        status = client.get_system_shared_memory_status(headers=hdr())
        check("mmgate_in" not in str(status), f"{tag} shared memory unregistered")
    finally:
        shm.destroy_shared_memory_region(ip)
        shm.destroy_shared_memory_region(op)


main()
