"""The OpenAI images API through the real server, called with the official `openai` client."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
from PIL import Image

from tests.support import serve

NAME = "kandinsky"


@pytest.fixture(scope="module")
def srv(tiny_model_dir):
    for running in serve(tiny_model_dir):
        yield running["base"]


@pytest.fixture
def client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv}/openai/v1", api_key="unused", timeout=300, max_retries=0)


def predict(base: str, **params) -> dict:  # type: ignore[no-untyped-def]
    r = httpx.post(f"{base}/v1/models/{NAME}:predict", timeout=300,
                   json={"instances": [{"query": "кот", "params": params}]})
    assert r.status_code == 200, r.text
    return r.json()


def metric(base: str, name: str, labels: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + labels + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [NAME]


def test_generate_gives_the_v1_images_for_the_same_seed_best_n_of_images_to_gen(srv, client):
    counted = metric(srv, "kandinsky_requests_total", '{code="200",protocol="openai",tenant=""}')
    r = client.images.generate(model=NAME, prompt="кот", n=2, size="256x256",
                               extra_body={"seed": 21, "images_to_gen": 3})
    assert r.size == "256x256" and r.output_format == "png" and len(r.data) == 2
    v1 = predict(srv, seed=21, images_to_gen=3, images_to_cherry_pick=2, super_res=False, format="png")
    assert [d.b64_json for d in r.data] == v1["images"]  # the same PNG files, best ruCLIP score first
    assert metric(srv, "kandinsky_requests_total", '{code="200",protocol="openai",tenant=""}') == counted + 1


def test_size_1024_is_the_x4_upscale_in_the_asked_format(client):
    r = client.images.generate(model=NAME, prompt="кот", size="1024x1024", output_format="jpeg",
                               extra_body={"seed": 3})
    image = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
    assert image.format == "JPEG" and image.size == (1024, 1024)


@pytest.mark.parametrize(
    ("kwargs", "param", "needle"),
    [
        ({"size": "512x512"}, "size", "256x256, 1024x1024"),
        ({"response_format": "url"}, "response_format", "b64_json"),
        ({"n": 17}, "n", "16"),
        ({"output_format": "gif"}, "output_format", "png"),
        ({"partial_images": 4}, "partial_images", "3"),
        ({"extra_body": {"top_k": 10**6}}, "top_k", "allowed: integer 1.."),
        ({"extra_body": {"temperature": 0}}, "temperature", "greater than 0"),
        ({"extra_body": {"images_to_gen": 1}, "n": 2}, "images_to_gen", ">= n"),
        ({"extra_body": {"steps": 5}}, "steps", "unknown parameter"),
        ({"prompt": "   "}, "prompt", "prompt"),
    ],
)
def test_bad_parameters_are_400_in_openai_shape_naming_the_param(client, kwargs, param, needle):
    args = {"model": NAME, "prompt": "кот", **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(**args)
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert needle in error["message"]


def test_another_model_name_is_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.images.generate(model="dall-e-3", prompt="кот")
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"


def test_stream_sends_partial_images_in_order_then_the_completed_images(srv, client):
    stream = client.images.generate(model=NAME, prompt="кот", n=2, size="256x256", stream=True,
                                    partial_images=2, extra_body={"seed": 22, "images_to_gen": 2})
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 4 + ["image_generation.completed"] * 2
    assert [e.partial_image_index for e in events[:4]] == [0, 0, 1, 1]
    for e in events[:4]:
        assert Image.open(io.BytesIO(base64.b64decode(e.b64_json))).size == (256, 256)
    v1 = predict(srv, seed=22, images_to_gen=2, images_to_cherry_pick=2, super_res=False, format="png")
    assert [e.b64_json for e in events[4:]] == v1["images"]


def test_body_errors_before_the_route_are_in_openai_shape_too(srv):
    r = httpx.post(f"{srv}/openai/v1/images/generations", content=b"{not json", timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_a_stream_whose_client_leaves_stops_its_generation(srv):
    import json
    import socket
    from urllib.parse import urlparse

    images = metric(srv, "kandinsky_images_total", "")
    body = json.dumps({"model": NAME, "prompt": "кот", "size": "256x256", "stream": True, "partial_images": 3,
                       "images_to_gen": 8, "seed": 4}).encode()
    port = urlparse(srv).port
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        head = "POST /openai/v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while b"image_generation.partial_image" not in received:  # a few rows in: the batch is running
            received += sock.recv(65536)
    # The next request runs after the abandoned one stopped; only its own image is counted.
    predict(srv, seed=5, images_to_gen=1, images_to_cherry_pick=1, super_res=False)
    assert metric(srv, "kandinsky_images_total", "") == images + 1


def test_image_prompt_in_the_extra_body_completes_the_image_and_bad_borders_name_it(srv, client):
    import json

    import numpy as np

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(3).random((64, 64, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    prompt = {"image": base64.b64encode(buf.getvalue()).decode(), "borders": {"up": 6}}
    r = client.images.generate(model=NAME, prompt="кот", size="256x256",
                               extra_body={"seed": 8, "image_prompt": prompt})
    v1 = predict(srv, seed=8, images_to_gen=1, images_to_cherry_pick=1, super_res=False, format="png",
                 image_prompt=prompt)
    assert [d.b64_json for d in r.data] == v1["images"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model=NAME, prompt="кот",
                               extra_body={"image_prompt": {**prompt, "borders": {"up": 40}}})
    assert caught.value.body["param"] == "image_prompt.borders.up", json.dumps(caught.value.body)
