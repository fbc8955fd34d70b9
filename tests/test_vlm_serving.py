"""Images through the whole serving path: the OpenAI chat API (``openai`` package, base64 images)
and gRPC (image bytes) on a tiny Qwen3-VL, served disaggregated and colocated, answer exactly what
the single-process engine answers; bad images are clear 400s / INVALID_ARGUMENT and the server
keeps serving. Everything binds to 127.0.0.1 and is stopped at the end."""

from __future__ import annotations

import base64
import http.server
import io
import struct
import threading
import zlib

import grpc
import pytest

from pop_disagg._proto import generation_pb2 as pb
from pop_disagg.config import EngineConfig, MediaConfig, ServeConfig
from pop_disagg.engine.engine import LLMEngine
from pop_disagg.engine.sampling import SamplingParams
from pop_disagg.models.loader import load_model
from pop_disagg.server.app import BackgroundServer

from .vlm_reference import noise_image

MAX_NEW = 8
MEDIA = MediaConfig(max_images_per_prompt=2, allowed_media_domains=("127.0.0.1",))


def _png(height: int, width: int, seed: int) -> bytes:
    buf = io.BytesIO()
    noise_image(height, width, seed).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (its pixel data never decodes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)  # a few rows' worth; the rest is missing
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def vl_path(tiny_vlm):
    return tiny_vlm("qwen3_vl")


def _config(path, topology: str) -> ServeConfig:
    engine = EngineConfig(model=path, kv_cache_memory_mb=4, block_size=4, max_model_len=512)
    return ServeConfig(engine=engine, topology=topology, prefill="pop", transfer_timeout_s=30, media=MEDIA)


@pytest.fixture(scope="module")
def reference(vl_path):
    """The single-process engine under the served plan (the default POP plan)."""
    return LLMEngine(_config(vl_path, "colocated").worker_engine, model=load_model(vl_path), model_path=vl_path)


@pytest.fixture(scope="module")
def server(vl_path, ray_instance):
    srv = BackgroundServer(_config(vl_path, "disaggregated"), http_port=0, served_model_name="tiny-vl")
    try:
        yield srv
    finally:
        srv.stop()


def _expected(engine: LLMEngine, text: str, images: list[bytes]):
    """The engine's greedy answer to one user message ``text`` ({} = an image) with ``images``."""
    from PIL import Image

    spec, inputs, tok = engine.vision_spec, engine.image_inputs, engine.tokenizer
    processed = [inputs.process(Image.open(io.BytesIO(b)).convert("RGB")) for b in images]
    chat = tok.apply_chat_template(
        [{"role": "user", "content": text.format(*[spec.placeholder] * len(images))}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tok.encode(inputs.expand(chat, processed), add_special_tokens=False)
    out = engine.generate([ids], SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True), images=[processed])[0]
    return ids, out


def _content(text: str, images: list[bytes]) -> list[dict]:
    parts, pieces = [], text.split("{}")
    for i, piece in enumerate(pieces):
        if piece:
            parts.append({"type": "text", "text": piece})
        if i < len(images):
            parts.append({"type": "image_url", "image_url": {"url": _data_url(images[i])}})
    return parts


CASES = {
    "one image": ("What is in {} here?", [(40, 70)]),
    "two images": ("Compare {} with {} please", [(64, 32), (48, 48)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_openai_sdk_with_base64_images_equals_engine(server, oa, reference, case):
    text, sizes = CASES[case]
    images = [_png(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    ids, want = _expected(reference, text, images)
    got = oa.chat.completions.create(
        model="tiny-vl",
        messages=[{"role": "user", "content": _content(text, images)}],
        max_tokens=MAX_NEW,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert got.choices[0].message.content == want.text
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == len(want.token_ids) == MAX_NEW


@pytest.mark.parametrize("case", list(CASES))
def test_grpc_image_bytes_equal_engine(server, stub, reference, case):
    text, sizes = CASES[case]
    images = [_png(h, w, seed=10 + i) for i, (h, w) in enumerate(sizes)]
    ids, want = _expected(reference, text, images)
    placeholder = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30).image_placeholder
    tok = reference.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": text.format(*[placeholder] * len(images))}],
        add_generation_prompt=True,
        tokenize=False,
    )
    by_text = stub.Generate(
        pb.GenerateRequest(prompt=prompt, images=images, max_new_tokens=MAX_NEW, ignore_eos=True), timeout=60
    )
    assert list(by_text.token_ids) == want.token_ids and by_text.usage.prompt_tokens == len(ids)
    by_ids = stub.Generate(
        pb.GenerateRequest(prompt_token_ids=ids, images=images, max_new_tokens=MAX_NEW, ignore_eos=True), timeout=60
    )
    assert list(by_ids.token_ids) == want.token_ids


def test_prefix_caches_serve_only_the_same_image(server, stub, reference):
    """Disaggregated, over gRPC: the same image behind the same text again comes from the prefix
    caches (``cached_tokens``: all its prefix's whole blocks) with the engine's tokens and logprobs;
    another image of the same size (the same token ids) reuses only the text before the image."""
    text = "Describe the picture for a catalogue, carefully and briefly: {} thanks"
    first, other = _png(48, 48, seed=60), _png(48, 48, seed=61)
    ids, _ = _expected(reference, text, [first])
    assert _expected(reference, text, [other])[0] == ids
    inputs = reference.image_inputs
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True, logprobs=1)

    def engine_answer(image: bytes):
        from PIL import Image

        processed = inputs.process(Image.open(io.BytesIO(image)).convert("RGB"))
        out = reference.generate([ids], params, images=[[processed]])[0]
        return out.token_ids, [lp.logprob for lp in out.logprobs]

    def served(image: bytes):
        msg = pb.GenerateRequest(
            prompt_token_ids=ids, images=[image], max_new_tokens=MAX_NEW, ignore_eos=True, logprobs=1
        )
        return stub.Generate(msg, timeout=60)

    block = reference.config.block_size
    start = ids.index(reference.vision_spec.image_token_id)
    assert block <= start  # text blocks before the image to reuse
    for image, cached in [(first, None), (first, (len(ids) - 1) // block * block), (other, start // block * block)]:
        want_ids, want_logprobs = engine_answer(image)
        got = served(image)
        assert list(got.token_ids) == want_ids
        assert max(abs(lp.logprob - w) for lp, w in zip(got.logprobs, want_logprobs)) < 1e-4
        if cached is not None:
            assert got.usage.cached_tokens == cached


def test_image_url_from_an_allowed_host_is_fetched(server, oa, reference):
    image = _png(40, 56, seed=20)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(image)))
            self.end_headers()
            self.wfile.write(image)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/cat.png"
        _, want = _expected(reference, "What is in {} here?", [image])
        parts = [
            {"type": "text", "text": "What is in "},
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": " here?"},
        ]
        got = oa.chat.completions.create(
            model="tiny-vl",
            messages=[{"role": "user", "content": parts}],
            max_tokens=MAX_NEW,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert got.choices[0].message.content == want.text
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


GOOD = _png(40, 40, seed=30)
_TRUNCATED = _png(64, 64, seed=31)
BAD_URLS = {
    "truncated png": (_data_url(_TRUNCATED[: len(_TRUNCATED) // 2]), "corrupt or truncated"),
    "1x1": (_data_url(_png(1, 1, seed=32)), "image is 1x1; both sides must be >= 8 pixels"),
    "20000x20000": (_data_url(_huge_png_header(20000, 20000)), "pixels"),
    "text mime": (_data_url(GOOD, "text/plain"), "unsupported media type 'text/plain'"),
    "jpeg declared, png sent": (_data_url(GOOD, "image/jpeg"), "declared image/jpeg but the data is PNG"),
    "not base64": ("data:image/png;base64,@@@@", "not valid base64"),
    "remote url": ("https://example.com/cat.png", "--allowed-media-domains"),
}


@pytest.mark.parametrize("case", list(BAD_URLS))
def test_bad_images_are_clear_400s_and_the_server_keeps_serving(server, http, case):
    url, message = BAD_URLS[case]
    body = {
        "model": "tiny-vl",
        "max_tokens": 2,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}],
            }
        ],
    }
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["param"] == "messages[0].content[1].image_url"
    good = {**body, "messages": [{"role": "user", "content": _content("ok {}", [GOOD])}]}
    assert http.post("/v1/chat/completions", json=good).status_code == 200


def test_image_count_limit_names_the_flag(server, http, stub):
    body = {
        "model": "tiny-vl",
        "max_tokens": 2,
        "messages": [{"role": "user", "content": _content("{}{}{}", [GOOD] * 3)}],
    }
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    assert "3 images in one prompt, at most 2 (--limit-mm-per-prompt image=2)" in r.json()["error"]["message"]
    with pytest.raises(grpc.RpcError) as exc:
        stub.Generate(pb.GenerateRequest(prompt="x", images=[GOOD] * 3, max_new_tokens=2), timeout=30)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--limit-mm-per-prompt" in exc.value.details()
    with pytest.raises(grpc.RpcError) as exc:
        stub.Generate(pb.GenerateRequest(prompt="x", images=[b"not an image"], max_new_tokens=2), timeout=30)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "images[0]: not an image" in exc.value.details()
    with pytest.raises(grpc.RpcError) as exc:  # an image the prompt has no placeholder for
        stub.Generate(pb.GenerateRequest(prompt="no placeholder", images=[GOOD], max_new_tokens=2), timeout=30)
    assert (
        exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "image placeholders for 1 images" in exc.value.details()
    )
    info = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=30)
    assert info.max_images_per_prompt == 2 and info.image_placeholder


def test_colocated_server_with_images_equals_engine(vl_path, ray_instance, reference):
    import openai

    srv = BackgroundServer(_config(vl_path, "colocated"), http_port=0, served_model_name="tiny-vl")
    try:
        text, sizes = CASES["two images"]
        images = [_png(h, w, seed=40 + i) for i, (h, w) in enumerate(sizes)]
        _, want = _expected(reference, text, images)
        with openai.OpenAI(base_url=f"{srv.http_url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
            got = client.chat.completions.create(
                model="tiny-vl",
                messages=[{"role": "user", "content": _content(text, images)}],
                max_tokens=MAX_NEW,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
        assert got.choices[0].message.content == want.text
    finally:
        srv.stop()


def test_an_image_larger_than_the_text_body_limit_is_served(server, http):
    from pop_disagg.server.frontend.http_api import MAX_BODY_BYTES

    big = _png(1500, 1500, seed=50)  # noise: ~6.7 MB of PNG, ~9 MB as base64
    assert len(big) > MAX_BODY_BYTES
    body = {"model": "tiny-vl", "max_tokens": 2, "messages": [{"role": "user", "content": _content("big {}", [big])}]}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_serve_flags_reach_the_media_config():
    from pop_disagg.cli import build_parser
    from pop_disagg.commands.serve import serve_config

    args = build_parser().parse_args(
        ["serve", "--limit-mm-per-prompt", '{"image": 3}', "--allowed-media-domains", "images.example.com, 127.0.0.1"]
    )
    media = serve_config(args).media
    assert media.max_images_per_prompt == 3 and media.allowed_media_domains == ("images.example.com", "127.0.0.1")
    assert serve_config(build_parser().parse_args(["serve"])).media == MediaConfig()


def test_limit_mm_per_prompt_takes_vllm_forms():
    from pop_disagg.server.frontend.multimodal import parse_mm_limit

    assert parse_mm_limit("image=3") == 3
    assert parse_mm_limit('{"image": 0}') == 0
    with pytest.raises(ValueError, match="only images are served, not video"):
        parse_mm_limit("image=1,video=2")
    with pytest.raises(ValueError, match="expected image=N"):
        parse_mm_limit("three")
