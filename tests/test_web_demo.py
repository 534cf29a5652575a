"""`unicode-mllm serve`: the web demo's actions, its CLI errors, and the page driven in Debian's headless Chromium.

The browser test starts the real command in a subprocess on a free loopback port over the tiny random model,
then asks about an uploaded image, draws, reconstructs and chats, checking each result against the library's
own functions. It screenshots the page; with UNICODE_MLLM_SCREENSHOT_DIR set, the stacked screenshots are
written there as web_demo.png (the README's docs/web_demo.png). UNICODE_MLLM_SERVE_MODEL (a saved model folder,
e.g. the demo's OUT/mllm/final) and UNICODE_MLLM_SERVE_PICTURE (an image) replace the tiny random model and the
drawn square, so that the screenshot shows a trained model; every check holds for any model. It skips, naming
what is missing, only where Chromium, chromedriver, selenium or gradio is absent (.ci/run installs them).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from unicode_mllm.cli import main
from unicode_mllm.errors import UserError
from unicode_mllm.generation import answer_questions, generate_images
from unicode_mllm.model import UniCodeMLLM
from unicode_mllm.web_demo_actions import (
    MAX_IMAGES,
    WebChat,
    answer_stream,
    code_id_picture,
    draw,
    reconstruct,
    save_drawings,
)

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = (  # known to work as root in a container; nothing reaches the network
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # no name resolves but the server's address
    "--window-size=1280,900",
)
QUESTION = "What colour is the square?"


@pytest.fixture(scope="module")
def served_dir(tiny_mllm_dir) -> Path:
    """The model the page serves: the tiny random one, or UNICODE_MLLM_SERVE_MODEL (module docstring)."""
    return Path(os.environ.get("UNICODE_MLLM_SERVE_MODEL") or tiny_mllm_dir)


@pytest.fixture(scope="module")
def model(served_dir) -> UniCodeMLLM:
    return UniCodeMLLM.from_pretrained(served_dir).eval()


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    if os.environ.get("UNICODE_MLLM_SERVE_PICTURE"):
        return Path(os.environ["UNICODE_MLLM_SERVE_PICTURE"])
    path = tmp_path_factory.mktemp("web_inputs") / "red.png"
    image = Image.new("RGB", (32, 32), (240, 240, 240))
    image.paste((200, 30, 30), (8, 8, 24, 24))
    image.save(path)
    return path


# ----- the actions, without a page ---------------------------------------------------------------------------


def test_answer_stream_grows_to_the_cli_answer(model, picture):
    (expected,) = answer_questions(model, [picture], [QUESTION], max_new_tokens=12)
    states = list(answer_stream(model, Image.open(picture), QUESTION, max_new_tokens=12))
    assert states[-1] == expected.text and expected.text
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(states))
    with pytest.raises(UserError, match="question is empty"):
        list(answer_stream(model, None, "  "))


def test_draw_reports_every_forward_and_matches_generate(model, tmp_path):
    steps: list[tuple[int, int]] = []
    result = draw(model, "a red circle", num_images=3, seed=5, on_step=lambda done, total: steps.append((done, total)))
    assert steps[-1] == (model.num_write_tokens, model.num_write_tokens)  # one batch: a forward per code
    cli = generate_images(model, ["a red circle"], num_images_per_prompt=3, seed=5)  # `unicode-mllm generate`
    assert torch.equal(result.token_ids, cli.token_ids)
    assert not model.lm._forward_hooks  # the progress hook is gone
    saved = save_drawings(model, result, tmp_path)
    record = json.loads(saved[1][1].read_text())
    assert record["token_ids"] == result.token_ids[1].tolist() and record["image_seed"] == result.seeds[1]
    assert Image.open(saved[1][0]).size == (32, 32)
    with pytest.raises(UserError, match=f"1..{MAX_IMAGES}"):
        draw(model, "a red circle", num_images=MAX_IMAGES + 1)


def test_reconstruct_and_code_id_picture(model, picture):
    result = reconstruct(model, Image.open(picture))
    h, w, d = model.code_shape
    assert result.codes.shape == (h, w, d) and result.pair.size == (64, 32) and result.psnr > 0
    image, summary = code_id_picture(result.codes, model.visual_tokenizer.config.num_codes)
    assert image.width > w * 14 * d and summary.count("distinct") == d
    with pytest.raises(UserError, match="upload one"):
        reconstruct(model, None)


def test_web_chat_asks_draws_resets_and_refuses_like_the_cli(model, picture, tmp_path):
    chat = WebChat.start(model, tmp_path)
    *_, messages = chat.send(QUESTION, Image.open(picture))
    (expected,) = answer_questions(model, [picture], [QUESTION])  # the first turn is a one-question prompt
    assert messages[-1] == {"role": "assistant", "content": expected.text}
    assert messages[0]["content"]["path"].endswith("_upload.png")
    *_, messages = chat.send("draw: a red circle", None)
    assert Path(messages[-1]["content"]["path"]).is_file() and chat.session.num_turns == 2
    for line, message in [("/image x.png", "image box"), ("/nope", "unknown command"), ("  ", "empty")]:
        with pytest.raises(UserError, match=message):
            list(chat.send(line, None))
    assert chat.session.num_turns == 2
    list(chat.send("/reset", None))
    assert chat.messages == [] and chat.session.num_turns == 0


# ----- the command line --------------------------------------------------------------------------------------


def test_serve_without_gradio_is_one_line_exit_2(capsys, monkeypatch, tiny_mllm_dir):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    assert main(["serve", "--model", str(tiny_mllm_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the web demo needs gradio") and "pip install 'unicode-mllm[demo]'" in err
    assert "\n" not in err


def test_serve_on_a_taken_port_or_a_missing_model_is_one_line(capsys, monkeypatch, tiny_mllm_dir):
    from unicode_mllm import web_demo

    monkeypatch.setattr(web_demo, "require_gradio", lambda: None)  # the port is checked before gradio is used
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(tiny_mllm_dir), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["serve", "--model", str(tiny_mllm_dir.parent / "nope"), "--port", str(_free_port())]) == 2
    assert "is not a saved UniCodeMLLM" in capsys.readouterr().err


# ----- the page in a real browser ----------------------------------------------------------------------------


def _browser_missing() -> str | None:
    for module, extra in (("gradio", "[demo]"), ("selenium", "[test]")):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed; pip install -e '.{extra}'"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            return f"{path} not found; apt-get install chromium chromium-driver (as .ci/run does)"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(served_dir, tmp_path_factory) -> Iterator[str]:
    """`unicode-mllm serve` over the tiny model, in a subprocess; its output is shown if it does not come up."""
    if (reason := _browser_missing()) is not None:
        pytest.skip(reason)
    port = _free_port()
    folder = tmp_path_factory.mktemp("web_server")
    log = folder / "serve.log"
    # The test's own threads: the answers it compares against are then computed the same way.
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    env["TMPDIR"] = str(folder)  # the drawings and gradio's file cache stay in the test's folder
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])  # this checkout
    command = [sys.executable, "-m", "unicode_mllm.cli", "serve", "--model", str(served_dir), "--device", "cpu"]
    with log.open("w") as out:
        server = subprocess.Popen(
            [*command, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not come up (exit {server.poll()}):\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def browser(server_url, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium_profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)  # no Selenium Manager download
    driver.get(server_url)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, seconds: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.2).until(condition)


def _value(driver, selector: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector).get_attribute("value") or ""


def _texts(driver, selector: str) -> list[str]:
    """The text of each match, whether or not it is on screen yet (a toast slides in)."""
    from selenium.webdriver.common.by import By

    return [(e.get_attribute("textContent") or "").strip() for e in driver.find_elements(By.CSS_SELECTOR, selector)]


def _open_tab(driver, name: str, ready: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.XPATH, f"//button[@role='tab' and normalize-space()='{name}']").click()
    _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, ready).is_displayed())


def _upload(driver, box: str, path: Path) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, f"#{box} input[type=file]").send_keys(str(path))
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, f"#{box} img"))


def _type(driver, box: str, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element(By.CSS_SELECTOR, f"#{box} textarea, #{box} input")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)  # a real edit: clear() alone does not reach gradio's state
    if text:
        field.send_keys(text)


def _stack_screenshots(parts: list[tuple[Path, int, int]], out: Path) -> None:
    """Bands (screenshot, top, bottom) of the screenshots, one under another: the README's picture of the page."""
    bands = [
        Image.open(path).convert("RGB").crop((0, top, Image.open(path).width, bottom)) for path, top, bottom in parts
    ]
    sheet = Image.new("RGB", (max(b.width for b in bands), sum(b.height for b in bands)), (255, 255, 255))
    for i, band in enumerate(bands):
        sheet.paste(band, (0, sum(b.height for b in bands[:i])))
    sheet.save(out)


def test_page_asks_draws_reconstructs_and_chats_in_chromium(browser, model, picture, tmp_path):
    from selenium.webdriver.common.by import By

    click = lambda element_id: browser.find_element(By.ID, element_id).click()  # noqa: E731
    shots = []

    # Ask: the answer the page streams is the library's greedy answer (64 tokens, the page's defaults).
    (expected,) = answer_questions(model, [picture], [QUESTION])
    assert expected.text
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#question textarea"))
    _upload(browser, "ask-image", picture)
    _type(browser, "question", QUESTION)
    click("ask-button")
    _wait(browser, lambda d: _value(d, "#answer textarea") == expected.text)
    shots.append(tmp_path / "ask.png")
    browser.save_screenshot(str(shots[-1]))

    # Draw: 4 images (the default) in the gallery; image_0.json is what `unicode-mllm generate --seed 7` writes.
    _open_tab(browser, "Draw", "#instruction textarea")
    _type(browser, "instruction", "a red circle")
    _type(browser, "seed", "7")
    click("draw-button")
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) >= 4)
    assert "seed 7" in browser.find_element(By.ID, "draw-seed").text
    anchors = browser.find_elements(By.CSS_SELECTOR, "#draw-files a[download]")
    links = {a.get_attribute("download"): a.get_attribute("href") for a in anchors}
    with urllib.request.urlopen(links["image_0.json"], timeout=10) as response:
        record = json.loads(response.read())
    cli = generate_images(model, ["a red circle"], num_images_per_prompt=4, seed=7)
    assert record["token_ids"] == cli.token_ids[0].tolist()
    shots.append(tmp_path / "draw.png")
    browser.save_screenshot(str(shots[-1]))
    _type(browser, "instruction", "")
    click("draw-button")  # a user error is shown as the CLI's one line
    toast = "[data-testid='toast-text']"
    _wait(browser, lambda d: any(t.startswith("error: the image prompt is empty") for t in _texts(d, toast)))

    # Reconstruct: the page's PSNR is the library's.
    _open_tab(browser, "Reconstruct", "#rec-button")
    _upload(browser, "rec-image", picture)
    click("rec-button")
    _wait(browser, lambda d: _value(d, "#rec-psnr textarea, #rec-psnr input"))
    assert (
        _value(browser, "#rec-psnr textarea, #rec-psnr input")
        == f"PSNR {reconstruct(model, Image.open(picture)).psnr:.2f} dB"
    )

    # Chat: a question about an image (its first turn is the Ask tab's prompt), then a drawing joins in.
    _open_tab(browser, "Chat", "#message textarea")
    _upload(browser, "chat-image", picture)
    _type(browser, "message", QUESTION)
    click("send-button")
    answered = lambda d: expected.text[:20] in _texts(d, "#chatbot")[0] and _value(d, "#message textarea") == ""  # noqa: E731
    _wait(browser, answered)  # the reply is in and the event is over (it clears the message box)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#chatbot img")) == 1  # the uploaded image
    _type(browser, "message", "a red circle")
    click("chat-draw-button")
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chatbot img")) == 2)

    screenshot_dir = os.environ.get("UNICODE_MLLM_SCREENSHOT_DIR")
    _stack_screenshots([(shots[0], 0, 520), (shots[1], 95, 750)], tmp_path / "web_demo.png")  # one title
    if screenshot_dir:
        Path(screenshot_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "web_demo.png", Path(screenshot_dir) / "web_demo.png")
