"""The demo's API through `gradio_client`, against an app launched on a free local port."""

from __future__ import annotations

import os

import pytest

gradio_client = pytest.importorskip("gradio_client")
pytest.importorskip("gradio")

from mmreduce.demo.app import EXAMPLES_DIR  # noqa: E402

# /compare's inputs in order: model, media, question, methods, warm-up, repeats, max new tokens, then the method
# parameters: fastv layer, fastv keep, pdrop layers, pdrop keep, random layer, random keep, random seed,
# schedule file, extra specs.
PARAMS = dict(fastv_layer=2, fastv_keep=0.25, pdrop_layers="", pdrop_keep=0.5, random_layer=2, random_keep=0.25,
              random_seed=0, schedule_file=None, extra_specs="")


@pytest.fixture(scope="module")
def client(demo_url):
    assert demo_url.startswith("http://127.0.0.1:")  # localhost unless asked otherwise
    return gradio_client.Client(demo_url, verbose=False)


def _compare(client, media, question="what color is the square ?", methods=("fastv",), **overrides):
    params = {**PARAMS, **overrides}
    return client.predict("tiny-llava-shapes", media, question, list(methods), 0, 1, 3, *params.values(),
                          api_name="/compare")


def test_compare_returns_both_answers_and_charts(client):
    media = gradio_client.handle_file(str(EXAMPLES_DIR / "shapes-0.png"))
    html, tokens, latency, schedule, gallery, details = _compare(client, media, methods=("fastv", "pdrop"))
    results = details["results"]
    assert [r["label"] for r in results][0] == "baseline" and len(results) == 3
    assert results[1]["vision_tokens_per_layer"] == [256, 256] + [64] * 6
    for result in results:
        assert result["answer"] and f">{result['answer']}</div>" in html
        assert result["total_ms"] > 0
    for plot in (tokens, latency, schedule):
        assert plot["type"] == "matplotlib" and plot["plot"].startswith("data:image/")
    assert len(gallery) == 1 + 3 and "layer 2 keeps 64/256" in gallery[0]["caption"]
    assert os.path.getsize(gallery[0]["image"]) > 0


def test_errors_come_back_as_messages(client):
    not_image = gradio_client.handle_file(str(EXAMPLES_DIR.parent.parent / "__init__.py"))
    with pytest.raises(gradio_client.exceptions.AppError, match="is not an image"):
        client.predict(not_image, api_name="/preview_media")
    image = gradio_client.handle_file(str(EXAMPLES_DIR / "shapes-0.png"))
    with pytest.raises(gradio_client.exceptions.AppError, match="greater than maximum value 1.0"):  # the slider checks itself
        _compare(client, image, fastv_keep=2.0)
    with pytest.raises(gradio_client.exceptions.AppError, match="out of range for a model with 8 decoder layers"):
        _compare(client, image, fastv_layer=12)
    with pytest.raises(gradio_client.exceptions.AppError, match="no image given"):
        _compare(client, None)
    with pytest.raises(gradio_client.exceptions.AppError, match="not in the list of choices"):  # the dropdown guards the model list
        client.predict("/tmp", image, "q ?", [], 0, 1, 3, *PARAMS.values(), api_name="/compare")
