"""Request validation: every kind of bad input is a RequestInvalid naming the field and its range."""

from __future__ import annotations

import json
import math

import pytest

from app.serving.core.errors import RequestInvalid
from app.serving.core.schema import CATALOG_EXAMPLE, SEED_MAX, Limits, Schema

SCHEMA = Schema(Limits(max_images_per_request=16, image_vocab_size=64))


def one(params: dict | None = None, **instance) -> dict:
    inst = {"query": "кот в шляпе", **instance}
    if params is not None:
        inst["params"] = params
    return {"instances": [inst]}


def error_of(body) -> str:
    with pytest.raises(RequestInvalid) as err:
        SCHEMA.parse(body)
    assert err.value.status == 400
    return err.value.message


def test_defaults_are_filled_from_the_spec():
    (inst,) = SCHEMA.parse(one())
    p = inst.params
    assert (p.images_to_gen, p.images_to_cherry_pick, p.top_p, p.super_res, p.temperature, p.format) == (
        8,
        4,
        0.975,
        True,
        1.0,
        "jpeg",
    )
    assert p.top_k == 64  # min(4096, image vocabulary)


def test_default_top_k_is_4096_with_a_large_vocabulary():
    schema = Schema(Limits(16, 8192))
    assert schema.parse(one())[0].params.top_k == 4096


def test_default_cherry_pick_shrinks_to_images_to_gen():
    (inst,) = SCHEMA.parse(one({"images_to_gen": 2}))
    assert inst.params.images_to_cherry_pick == 2


def test_default_images_to_gen_respects_a_small_server_limit():
    schema = Schema(Limits(max_images_per_request=3, image_vocab_size=64))
    assert schema.parse(one())[0].params.images_to_gen == 3


def test_random_seed_is_in_range_and_differs_between_requests():
    seeds = {SCHEMA.parse(one())[0].params.seed for _ in range(8)}
    assert all(0 <= s <= SEED_MAX for s in seeds)
    assert len(seeds) > 1


def test_given_values_are_kept_and_floats_accept_ints():
    params = {
        "images_to_gen": 3,
        "images_to_cherry_pick": 1,
        "top_k": 64,
        "top_p": 1,
        "temperature": 10,
        "seed": SEED_MAX,
        "format": "webp",
        "super_res": False,
        "preview_every": 4,
    }
    (inst,) = SCHEMA.parse(one(params))
    assert inst.params.model_dump() == {**params, "top_p": 1.0, "temperature": 10.0, "image_prompt": None}
    assert isinstance(inst.params.top_p, float)


def test_query_is_stripped():
    assert SCHEMA.parse(one(query="  Кот  "))[0].query == "Кот"


def test_catalog_example_is_valid():
    (inst,) = SCHEMA.parse(CATALOG_EXAMPLE)
    p = inst.params
    assert (p.images_to_gen, p.images_to_cherry_pick, p.super_res) == (4, 2, False)


def test_raw_json_bytes_are_parsed():
    assert SCHEMA.parse(b'{"instances": [{"query": "a"}]}')[0].query == "a"


def test_several_instances_keep_their_order():
    body = {"instances": [{"query": "a"}, {"query": "b", "params": {"seed": 5}}]}
    a, b = SCHEMA.parse(body)
    assert (a.query, b.query, b.params.seed) == ("a", "b", 5)


def test_server_limit_bounds_the_images_of_the_whole_request():
    # Two default instances (8 + 8) fit the limit of 16; a third one does not.
    assert len(SCHEMA.parse({"instances": [{"query": "a"}, {"query": "b"}]})) == 2
    third = {"query": "c", "params": {"images_to_gen": 1}}
    message = error_of({"instances": [{"query": "a"}, {"query": "b"}, third]})
    assert message.startswith("instances: asks for 17 images in all")
    assert "server limit" in message and "16" in message


@pytest.mark.parametrize(
    ("params", "field", "needle"),
    [
        ({"images_to_gen": "8"}, "images_to_gen", "must be an integer, got string"),
        ({"images_to_gen": True}, "images_to_gen", "must be an integer, got boolean"),
        ({"images_to_gen": 1.5}, "images_to_gen", "must be an integer, got number"),
        ({"images_to_gen": 2.0}, "images_to_gen", "must be an integer"),
        ({"images_to_gen": 0}, "images_to_gen", "must be >= 1"),
        ({"images_to_gen": 17}, "images_to_gen", "must be <= 16 (server limit)"),
        ({"images_to_cherry_pick": 0}, "images_to_cherry_pick", "must be >= 1"),
        ({"images_to_gen": 2, "images_to_cherry_pick": 3}, "images_to_cherry_pick", "<= images_to_gen (2)"),
        ({"images_to_cherry_pick": None}, "images_to_cherry_pick", "got null"),
        ({"top_k": 0}, "top_k", "must be >= 1"),
        ({"top_k": 65}, "top_k", "must be <= 64 (image vocabulary size)"),
        ({"top_p": 0}, "top_p", "must be > 0"),
        ({"top_p": 1.01}, "top_p", "must be <= 1"),
        ({"top_p": math.nan}, "top_p", "finite"),
        ({"top_p": "0.9"}, "top_p", "must be a number, got string"),
        ({"temperature": 0.0}, "temperature", "must be > 0"),
        ({"temperature": 10.5}, "temperature", "must be <= 10"),
        ({"temperature": math.inf}, "temperature", "finite"),
        ({"temperature": -math.inf}, "temperature", "finite"),
        ({"temperature": True}, "temperature", "must be a number, got boolean"),
        ({"super_res": 1}, "super_res", "must be true or false"),
        ({"super_res": "true"}, "super_res", "must be true or false"),
        ({"seed": -1}, "seed", "must be >= 0"),
        ({"seed": 2**63}, "seed", f"must be <= {SEED_MAX}"),
        ({"seed": 1e23}, "seed", "must be an integer"),
        ({"format": "gif"}, "format", "must be one of"),
        ({"format": "JPEG"}, "format", "must be one of"),
        ({"steps": 10}, "steps", "unknown key"),
    ],
)
def test_bad_param_is_rejected_naming_the_field(params, field, needle):
    message = error_of(one(params))
    assert message.startswith(f"instances[0].params.{field}: ")
    assert needle in message


def test_out_of_range_error_states_the_allowed_range():
    assert "allowed: integer 1..64" in error_of(one({"top_k": 100}))


def test_params_must_be_an_object():
    assert error_of(one("fast")).startswith("instances[0].params: must be an object")


def test_unknown_instance_key_is_rejected():
    assert error_of(one(prompt="x")).startswith("instances[0].prompt: unknown key")


def test_unknown_top_level_key_is_rejected():
    assert error_of({"instances": [{"query": "a"}], "inputs": []}).startswith("inputs: unknown key")


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("", "must not be empty"),
        ("   \n\t", "must not be empty"),
        ("x" * 1001, "at most 1000 characters"),
        (5, "must be a string, got integer"),
        (None, "must be a string, got null"),
        (["a"], "must be a string, got array"),
    ],
)
def test_bad_query_is_rejected(query, needle):
    message = error_of({"instances": [{"query": query}]})
    assert message.startswith("instances[0].query: ")
    assert needle in message


def test_query_of_exactly_1000_characters_is_accepted():
    assert len(SCHEMA.parse(one(query="я" * 1000))[0].query) == 1000


def test_missing_query_is_rejected():
    assert error_of({"instances": [{"params": {}}]}).startswith("instances[0].query: is required")


def test_error_names_the_right_instance():
    body = {"instances": [{"query": "ok"}, {"query": "ok", "params": {"top_k": 0}}]}
    assert error_of(body).startswith("instances[1].params.top_k:")


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({}, "instances: is required"),
        ({"instances": []}, "instances: must not be empty"),
        ({"instances": "kot"}, "instances: must be a list"),
        ({"instances": {"query": "a"}}, "instances: must be a list"),
        ({"instances": [{"query": "a"}] * 17}, "instances: must have at most 16 items"),
        ({"instances": ["kot"]}, "instances[0]: must be an object"),
        ([{"query": "a"}], "body: must be a JSON object"),
        (b"not json", "body: not valid JSON"),
        (b'{"instances": [{"query": "a", "params": {"top_p": NaN}}]}', "body: not valid JSON"),
        (b'{"instances": [{"query": "a", "params": {"top_p": Infinity}}]}', "body: not valid JSON"),
        (b'{"instances": [{"query": "a", "params": {"top_p": 1e400}}]}', "body: not valid JSON"),
    ],
)
def test_bad_body_is_rejected(body, needle):
    assert needle in error_of(body)


def test_every_bad_field_is_reported():
    message = error_of(one({"top_k": 0, "top_p": 2}))
    assert "params.top_k" in message and "params.top_p" in message


def test_params_json_schema_shows_bounds_and_defaults():
    props = SCHEMA.params.model_json_schema()["properties"]
    assert props["top_k"]["maximum"] == 64 and props["top_k"]["default"] == 64
    assert props["images_to_gen"]["maximum"] == 16 and props["images_to_gen"]["default"] == 8
    assert props["top_p"]["exclusiveMinimum"] == 0 and props["top_p"]["maximum"] == 1
    assert props["format"]["enum"] == ["jpeg", "png", "webp"]
    assert "default" not in props["seed"]  # random per request: documented, not a fixed value
    assert "min(4, images_to_gen)" in props["images_to_cherry_pick"]["description"]


# ---- image prompts (SPEC section 9) ------------------------------------------------------------------


def png_b64(width: int = 40, height: int = 30) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_image_prompt_is_accepted_with_missing_sides_as_zero():
    (inst,) = SCHEMA.parse(one({"image_prompt": {"image": png_b64(), "borders": {"up": 4, "left": 2}}}))
    prompt = inst.params.image_prompt
    assert prompt.borders.model_dump() == {"up": 4, "down": 0, "left": 2, "right": 0}
    assert prompt.crop_first is False


@pytest.mark.parametrize(
    ("prompt", "field", "needle"),
    [
        ({"image": "not base64!", "borders": {"up": 4}}, "image_prompt.image", "base64"),
        ({"image": "aGVsbG8gd29ybGQ=", "borders": {"up": 4}}, "image_prompt.image", "not an image"),
        ({"image": png_b64(2049, 2048), "borders": {"up": 4}}, "image_prompt.image", "more than the limit"),
        ({"image": png_b64(), "borders": {"up": 33}}, "image_prompt.borders.up", "<= 32"),
        ({"image": png_b64(), "borders": {"left": -1}}, "image_prompt.borders.left", ">= 0"),
        ({"image": png_b64(), "borders": {"up": True}}, "image_prompt.borders.up", "must be an integer"),
        ({"image": png_b64(), "borders": {}}, "image_prompt.borders", "at least one"),
        ({"image": png_b64(), "borders": {"left": 16, "right": 16}}, "image_prompt.borders", "no position"),
        ({"image": png_b64(), "borders": {"top": 4}}, "image_prompt.borders.top", "unknown key"),
        ({"image": png_b64()}, "image_prompt.borders", "is required"),
        ({"borders": {"up": 4}}, "image_prompt.image", "is required"),
        ({"image": png_b64(), "borders": {"up": 4}, "crop_first": 1}, "image_prompt.crop_first",
         "true or false"),
        ("a picture", "image_prompt", "must be an object"),
    ],
)
def test_bad_image_prompt_is_400_naming_its_field(prompt, field, needle):
    message = error_of(one({"image_prompt": prompt}))
    assert message.startswith(f"instances[0].params.{field}: "), message
    assert needle in message


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"instances": [{"query": "кот \\ud800"}]}', "instances[0].query"),
        ('{"instances": [{"query": "\\udfff"}]}', "instances[0].query"),
        ('{"instances": [{"query": "кот", "params": {"image_prompt": {"image": "iVBO\\ud800", '
         '"borders": {"up": 4}}}}]}', "instances[0].params.image_prompt.image"),
        ('{"instances": [{"query": "кот", "params": {"format": "png\\ud800"}}]}',
         "instances[0].params.format"),
    ],
)
def test_text_with_a_lone_surrogate_is_refused_naming_the_field_in_an_encodable_message(body, field):
    with pytest.raises(RequestInvalid) as err:
        SCHEMA.parse(json.loads(body))  # Python's JSON reader keeps the lone surrogate, as a client's may
    message = err.value.message
    assert message.startswith(field + ":")
    message.encode("utf-8")  # the answer itself can be sent
