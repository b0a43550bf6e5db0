"""The demo's API through `gradio_client`, against an app launched on a free local port."""

from __future__ import annotations

import pytest

gradio_client = pytest.importorskip("gradio_client")
pytest.importorskip("gradio")

from mmreduce.demo.app import EXAMPLES_DIR
from mmreduce.demo.ui import API_PARAMETERS

QUICK = dict(warmup=0, repeats=1, max_new_tokens=2)


@pytest.fixture(scope="module")
def client(demo_url):
    assert demo_url.startswith("http://127.0.0.1:")  # localhost unless asked otherwise
    return gradio_client.Client(demo_url, verbose=False)


def _image(name: str = "shapes-0.png"):
    return gradio_client.handle_file(str(EXAMPLES_DIR / name))


def test_api_names_its_parameters_and_at_most_three_are_required(client):
    [endpoint] = [info for name, info in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
                  .items() if name == "/compare"]
    names = [p["parameter_name"] for p in endpoint["parameters"]]
    assert names == ["image", "question", "methods", *API_PARAMETERS]
    required = [p["parameter_name"] for p in endpoint["parameters"] if not p["parameter_has_default"]]
    assert required[:2] == ["image", "question"] and set(required) <= {"image", "question", "methods"}


def test_one_line_call_with_image_question_and_methods(client):
    """The simplest call: defaults for everything else (the default model, 7 timed runs), results as JSON."""
    result = client.predict(_image(), "what color is the square ?", ["fastv"], api_name="/compare")
    baseline, fastv = result["results"]
    assert result["model"] == "tiny-llava-shapes" and baseline["label"] == "baseline"
    assert baseline["answer"] == "red" and baseline["runs"] == API_PARAMETERS["repeats"]
    assert fastv["vision_tokens_per_layer"] == [256, 256] + [64] * 6  # fastv's default: layer 2, keep 0.25
    assert len(fastv["total_runs_ms"]) == 7 and fastv["total_iqr_ms"] >= 0 and isinstance(result["notes"], list)


def test_named_parameters_and_composed_specs(client):
    result = client.predict(_image("docs-0.png"), "what digit is in the cyan box ?", ["pool"],
                            model="tiny-internvl-docs", extra_specs="visionzip:keep_ratio=0.5 then pdrop:layers=4",
                            **QUICK, api_name="/compare")
    labels = [r["label"] for r in result["results"]]
    assert result["model"] == "tiny-internvl-docs" and labels[1].startswith("pool") and labels[2].startswith("visionzip")
    assert result["results"][0]["vision_tokens_per_layer"][0] == 80


def test_errors_come_back_as_messages_without_server_paths(client):
    not_image = gradio_client.handle_file(str(EXAMPLES_DIR.parent.parent / "__init__.py"))
    with pytest.raises(gradio_client.exceptions.AppError, match="is not an image") as caught:
        client.predict(not_image, api_name="/preview_media")
    assert "/" not in str(caught.value).split("is not an image")[0]
    with pytest.raises(gradio_client.exceptions.AppError, match="greater than maximum value 1.0"):  # the slider checks itself
        client.predict(_image(), "q ?", ["fastv"], fastv_keep=2.0, **QUICK, api_name="/compare")
    with pytest.raises(gradio_client.exceptions.AppError, match="out of range for a model with 8 decoder layers"):
        client.predict(_image(), "what color is the square ?", ["fastv"], fastv_layer=12, **QUICK, api_name="/compare")
    with pytest.raises(gradio_client.exceptions.AppError, match="no image given"):
        client.predict(None, "what color is the square ?", ["fastv"], **QUICK, api_name="/compare")
    with pytest.raises(gradio_client.exceptions.AppError, match="not in the list of choices"):  # the dropdown guards the model list
        client.predict(_image(), "q ?", [], model="/tmp", **QUICK, api_name="/compare")
    with pytest.raises(gradio_client.exceptions.AppError, match="tcc") as caught:  # refused by the method while running
        client.predict(_image(), "what color is the square ?", ["tcc"], **QUICK, api_name="/compare")
    assert "/work" not in str(caught.value)
