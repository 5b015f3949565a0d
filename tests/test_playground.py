"""The web playground at /, driven in headless Chromium (Selenium) against a real live server on the tiny models.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and the PyPI ``selenium`` package
(the ``test`` extra); without them the tests skip and say which one is missing.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil

import pytest
from conftest import float32_default
from service_support import LiveServer

pytestmark = pytest.mark.slow  # a real browser end to end: `make test-fast` leaves it out

SR = 44100
WAIT = 90  # seconds; generous, the CI machine has two cores and may be busy

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait


def _find(name: str, debian_path: str) -> str | None:
    path = shutil.which(name)
    if path:
        return path
    return debian_path if os.access(debian_path, os.X_OK) else None


CHROMIUM = _find("chromium", "/usr/bin/chromium")
CHROMEDRIVER = _find("chromedriver", "/usr/bin/chromedriver")


@pytest.fixture(autouse=True)
def _float32():
    """The live server generates while this module's tests run; other modules may leave a float64 default."""
    with float32_default():
        yield


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Debian package chromium is not installed (no chromium on PATH or at /usr/bin/chromium)")
    if CHROMEDRIVER is None:
        pytest.skip("Debian package chromium-driver is not installed (no chromedriver on PATH or at "
                    "/usr/bin/chromedriver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1600", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path keeps Selenium Manager from looking for (or downloading) a driver.
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_script_timeout(WAIT)
    yield driver
    driver.quit()


def console(driver) -> str:
    """The page's console messages, for assertion messages."""
    try:
        return "\n".join(f"{e['level']}: {e['message']}" for e in driver.get_log("browser")) or "(console empty)"
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        return f"(console log unavailable: {exc})"


def wait_for(driver, condition, what: str, timeout: float = WAIT):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)
    except TimeoutException:
        error = driver.find_element(By.ID, "error")
        raise AssertionError(f"timed out waiting for {what}; #error={error.text!r}; status="
                             f"{driver.find_element(By.ID, 'status').text!r}\n{console(driver)}") from None


def set_value(driver, element_id: str, text: str) -> None:
    el = driver.find_element(By.ID, element_id)
    el.clear()
    el.send_keys(text)


def wait_for_audio(driver, previous_src: str = "") -> str:
    """Waits for a new blob: source on the <audio> element; fails at once when the page shows an error instead."""
    def result(d):
        error = d.find_element(By.ID, "error")
        if error.is_displayed():
            raise AssertionError(f"the page shows an error instead of audio: {error.text!r}\n{console(d)}")
        src = d.find_element(By.ID, "player").get_attribute("src") or ""
        return src if src.startswith("blob:") and src != previous_src else False

    return wait_for(driver, result, "an <audio> element with a new blob: source")


def models_loaded(driver) -> bool:
    return driver.find_element(By.ID, "model").is_enabled() and driver.find_element(By.ID, "generate").is_enabled()


# Runs inside the page: fetch the <audio> element's blob: source, read the WAV header by hand, decode it with
# WebAudio, and return both views plus the raw bytes.
CHECK_AUDIO_JS = r"""
const done = arguments[arguments.length - 1];
(async () => {
  const src = document.getElementById("player").src;
  const bytes = await (await fetch(src)).arrayBuffer();
  const v = new DataView(bytes);
  const tag = (o) => String.fromCharCode(...new Uint8Array(bytes, o, 4));
  const header = { riff: tag(0), wave: tag(8) };
  for (let o = 12; o + 8 <= bytes.byteLength; ) {
    const id = tag(o), size = v.getUint32(o + 4, true);
    if (id === "fmt ") {
      Object.assign(header, { format: v.getUint16(o + 8, true), channels: v.getUint16(o + 10, true),
        sampleRate: v.getUint32(o + 12, true), bits: v.getUint16(o + 22, true) });
    } else if (id === "data") {
      header.dataBytes = size;
    }
    o += 8 + size + (size & 1);
  }
  // Decoding at 44.1 kHz gives the file's own frame count only if the file is 44.1 kHz (otherwise it resamples).
  const audio = await new OfflineAudioContext(2, 1, 44100).decodeAudioData(bytes.slice(0));
  let peak = 0;
  for (let c = 0; c < audio.numberOfChannels; c++) {
    for (const x of audio.getChannelData(c)) peak = Math.max(peak, Math.abs(x));
  }
  let binary = "";
  for (const b of new Uint8Array(bytes)) binary += String.fromCharCode(b);
  done({ src, header, decoded: { channels: audio.numberOfChannels, length: audio.length,
         sampleRate: audio.sampleRate, peak }, base64: btoa(binary) });
})().catch((e) => done({ error: String(e) }));
"""

# Runs inside the page: how much the spectrogram canvas varies (a blank or one-colour canvas has 1 colour).
CANVAS_STATS_JS = r"""
const c = document.getElementById("spectrogram");
const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
const colours = new Set();
let sum = 0, sum2 = 0, n = 0;
for (let i = 0; i < d.length; i += 4) {
  colours.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
  const y = 0.2126 * d[i] + 0.7152 * d[i + 1] + 0.0722 * d[i + 2];
  sum += y; sum2 += y * y; n++;
}
const mean = sum / n;
return { colours: colours.size, mean, std: Math.sqrt(Math.max(0, sum2 / n - mean * mean)),
         opaque: d[3] === 255 };
"""


def test_page_and_static_files_are_served(server):
    with server.client() as c:
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'id="gen-form"' in page.text and "/static/playground.js" in page.text
        for name, kind in (("playground.js", "javascript"), ("playground.css", "text/css")):
            r = c.get(f"/static/{name}")
            assert r.status_code == 200 and kind in r.headers["content-type"], (name, r.headers)
            # Everything the page loads comes from this server: it must work offline (no CDN).
            assert "://" not in r.text, name
        assert "://" not in page.text
        assert c.get("/docs").status_code == 200


def test_spectrogram_maths(server, browser):
    """The spectrogram's radix-2 FFT, run in the browser, against numpy; and its STFT on a known sine."""
    import numpy as np

    browser.get(server.url + "/")
    rng = np.random.default_rng(0)
    x = rng.standard_normal(256) + 1j * rng.standard_normal(256)
    got = browser.execute_script(
        "const re = Float64Array.from(arguments[0]), im = Float64Array.from(arguments[1]);"
        "window.playground.makeFFT(re.length)(re, im); return [Array.from(re), Array.from(im)];",
        x.real.tolist(), x.imag.tolist())
    np.testing.assert_allclose(np.array(got[0]) + 1j * np.array(got[1]), np.fft.fft(x), atol=1e-9)

    # A full-scale sine at exactly bin 128 of a 1024-point frame: every column peaks there, at about 0 dBFS.
    peaks = browser.execute_script("""
      const n = 8192, sine = new Float32Array(n);
      for (let i = 0; i < n; i++) sine[i] = Math.sin(2 * Math.PI * 128 * i / 1024);
      const { db, bins, columns } = window.playground.stftDb(sine, 1024, 8);
      return Array.from({length: columns}, (_, c) => {
        const col = Array.from(db.subarray(c * bins, (c + 1) * bins));
        const top = Math.max(...col);
        return [col.indexOf(top), top];
      });""")
    assert len(peaks) == 8
    for k, top in peaks:
        assert k == 128 and abs(top) < 0.1, peaks


def test_generate_in_the_browser(server, browser):
    browser.get(server.url + "/")
    wait_for(browser, models_loaded, "the model list from GET /models")

    # The model select lists every model with its kind and default steps; changing it resets the defaults.
    model = Select(browser.find_element(By.ID, "model"))
    options = {o.get_attribute("value"): o.text for o in model.options}
    assert set(options) == {"tiny", "tiny-arc"}
    assert "teacher" in options["tiny"] and "4 steps" in options["tiny"] and "arc" in options["tiny-arc"]
    assert model.first_selected_option.get_attribute("value") == "tiny"  # the server's default model
    guidance = browser.find_element(By.ID, "guidance")
    assert guidance.get_attribute("placeholder") == "default 3"
    model.select_by_value("tiny-arc")
    assert guidance.get_attribute("placeholder") == "default 1"
    assert "pingpong" in browser.find_element(By.ID, "model-help").text
    assert browser.find_element(By.ID, "steps").get_attribute("value") == "4"
    model.select_by_value("tiny")

    prompt = "A dog barks twice!"
    seed = 2**63 - 1  # beyond 2^53: only exact if the page sends the digits verbatim
    set_value(browser, "prompt", prompt)
    set_value(browser, "duration", "1")
    set_value(browser, "steps", "3")
    set_value(browser, "seed", str(seed))

    # Record what the page shows while it works: a disabled button and the progress display.
    browser.execute_script("""
      window.seen = {disabled: false, progress: false};
      const button = document.getElementById("generate"), box = document.getElementById("progress-box");
      new MutationObserver(() => {
        seen.disabled ||= button.disabled;
        seen.progress ||= !box.hidden;
      }).observe(document.body, {attributes: true, subtree: true});
    """)
    browser.find_element(By.ID, "generate").click()
    wait_for_audio(browser)
    assert browser.execute_script("return window.seen") == {"disabled": True, "progress": True}
    assert browser.find_element(By.ID, "generate").is_enabled()
    assert not browser.find_element(By.ID, "error").is_displayed()

    audio = browser.execute_async_script(CHECK_AUDIO_JS)
    assert "error" not in audio, f"{audio['error']}\n{console(browser)}"
    header, decoded = audio["header"], audio["decoded"]
    assert (header["riff"], header["wave"], header["format"], header["bits"]) == ("RIFF", "WAVE", 1, 16)
    assert (header["sampleRate"], header["channels"]) == (SR, 2)
    assert header["dataBytes"] == SR * 2 * 2  # 1 s of 16-bit stereo
    assert (decoded["channels"], decoded["length"], decoded["sampleRate"]) == (2, SR, SR)
    assert decoded["peak"] > 0

    # The browser got exactly what the API returns for the same request (the seed arrived intact).
    with server.client() as c:
        direct = c.post("/generate", json={"prompt": prompt, "model": "tiny", "duration": 1, "steps": 3,
                                           "seed": seed, "format": "wav"})
    assert direct.status_code == 200
    wav = base64.b64decode(audio["base64"])
    assert hashlib.sha256(wav).hexdigest() == hashlib.sha256(direct.content).hexdigest()

    # Seed, download link, timings.
    assert browser.find_element(By.ID, "seed-out").text == str(seed)
    link = browser.find_element(By.ID, "download")
    assert link.get_attribute("href") == audio["src"]
    assert link.get_attribute("download") == f"a-dog-barks-twice-seed{seed}.wav"
    rows = [r.find_elements(By.TAG_NAME, "td") for r in browser.find_elements(By.CSS_SELECTOR, "#timing tbody tr")]
    stages = {cells[0].text: float(cells[1].text) for cells in rows}
    assert list(stages)[:4] == ["queue", "encode", "denoise", "decode"]
    assert stages["denoise"] > 0 and stages["decode"] > 0

    # The spectrogram is drawn after decoding: wait until the canvas shows an image with structure.
    stats = wait_for(browser, lambda d: (s := d.execute_script(CANVAS_STATS_JS))["colours"] > 20 and s,
                     "a spectrogram on the canvas")
    assert stats["opaque"] and stats["std"] > 5, stats
    assert "44100 Hz" in browser.find_element(By.ID, "spectrogram").get_attribute("aria-label")

    # The progress bar follows the job's events: one value per denoising step, in order, then decoding.
    browser.execute_script("""
      window.progressValues = [];
      window.progressLabels = [];
      const bar = document.getElementById("progress"), label = document.getElementById("progress-label");
      new MutationObserver(() => bar.hasAttribute("value") && progressValues.push(bar.value))
        .observe(bar, {attributes: true});
      new MutationObserver(() => progressLabels.push(label.textContent))
        .observe(label, {childList: true, characterData: true, subtree: true});
    """)
    browser.find_element(By.ID, "reuse-seed").click()
    set_value(browser, "duration", "2")
    first_src = audio["src"]
    browser.find_element(By.ID, "generate").click()
    wait_for_audio(browser, first_src)
    second = browser.execute_async_script(CHECK_AUDIO_JS)
    assert "error" not in second, second["error"]
    assert second["decoded"]["length"] == 2 * SR and second["header"]["dataBytes"] == 2 * SR * 4
    values = browser.execute_script("return window.progressValues")
    labels = browser.execute_script("return window.progressLabels")
    assert values == sorted(values) and values[-1] == 1, values
    for step in (1, 2, 3):
        assert pytest.approx(0.95 * step / 3) in values and f"Denoising: step {step} of 3…" in labels, labels
    assert "Decoding…" in labels


def test_cancel_stops_the_job_on_the_server(server, browser):
    """Cancel during denoising cancels the job (DELETE /jobs/{id}): the page says so and the engine runs nothing
    more for it."""
    browser.get(server.url + "/")
    wait_for(browser, models_loaded, "the model list from GET /models")
    set_value(browser, "prompt", "slow wind [[slow=200]]")
    set_value(browser, "duration", "1")
    set_value(browser, "steps", "40")
    browser.find_element(By.ID, "generate").click()
    label = browser.find_element(By.ID, "progress-label")
    wait_for(browser, lambda d: "step 2 of 40" in label.text, "the second denoising step")
    browser.find_element(By.ID, "cancel").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "status").text == "Cancelled.", "the cancellation")
    assert browser.find_element(By.ID, "generate").is_enabled()
    assert not browser.find_element(By.ID, "error").is_displayed()
    assert sum(len(s.running) + s.depth() for s in server.engine.schedulers.values()) == 0
    assert server.metric("tta_jobs", state="cancelled") >= 1


def test_api_key_and_errors(base_settings, browser):
    """With API keys configured the page asks for one, shows the 401 clearly, and sends the key it is given."""
    with float32_default():
        srv = LiveServer(base_settings.model_copy(update={"api_keys": "playground-key"}))
    try:
        browser.execute_script("sessionStorage.clear()")
        browser.get(srv.url + "/")
        error = browser.find_element(By.ID, "error")
        wait_for(browser, lambda d: error.is_displayed(), "the 401 from GET /models")
        assert "401" in error.text and "unauthorized" in error.text and "API key" in error.text
        key = browser.find_element(By.ID, "api-key")
        assert key.is_displayed() and not browser.find_element(By.ID, "generate").is_enabled()

        key.send_keys("wrong-key")
        browser.find_element(By.ID, "prompt").click()  # leaving the field commits the key
        wait_for(browser, lambda d: "the key entered was refused" in error.text, "the wrong key refused")
        assert "401" in error.text
        assert not browser.find_element(By.ID, "generate").is_enabled()

        key.clear()
        key.send_keys("playground-key")
        browser.find_element(By.ID, "prompt").click()
        wait_for(browser, models_loaded, "the model list once the right key is given")
        assert not error.is_displayed()

        set_value(browser, "prompt", "rain on a tin roof")
        browser.find_element(By.ID, "generate").click()
        wait_for_audio(browser)
        audio = browser.execute_async_script(CHECK_AUDIO_JS)
        assert (audio["header"]["sampleRate"], audio["header"]["channels"]) == (SR, 2)
        assert audio["decoded"]["length"] == SR  # the tiny model's default duration, 1 s
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------------ generation modes
# Runs in the page before a generation: records what each POST /jobs carries (the page calls the global fetch).
RECORD_REQUESTS_JS = r"""
window.sentForms = [];
const send = window.fetch;
window.fetch = (url, options = {}) => {
  if (String(url).endsWith("/jobs") && options.method === "POST") {
    const body = options.body, entry = { multipart: body instanceof FormData };
    if (body instanceof FormData) {
      for (const [k, v] of body) entry[k] = v instanceof Blob ? { file: v.name, size: v.size } : v;
    }
    sentForms.push(entry);
  }
  return send(url, options);
};
"""

# Added to every new document while a test needs it: GET /models answers with other modes than the server's.
STUB_MODES_JS = r"""
const realFetch = window.fetch;
window.fetch = async (url, options) => {
  const resp = await realFetch(url, options);
  if (String(url) !== "/models" || !resp.ok) return resp;
  const list = await resp.json();
  for (const m of list) m.modes = %s[m.name];
  return new Response(JSON.stringify(list), { status: 200, headers: { "content-type": "application/json" } });
};
"""

PIXEL_JS = r"""
const c = document.getElementById(arguments[0]);
return Array.from(c.getContext("2d").getImageData(Math.round(arguments[1] * c.width), c.height / 2, 1, 1).data);
"""


def write_clip(path, seconds: float = 1.0, rate: int = 22050, freq: float = 440.0) -> bytes:
    """A mono 16-bit WAV tone at its own rate (the server resamples it); returns its bytes."""
    import numpy as np
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, subtype="PCM_16")
    return path.read_bytes()


def post_form(server, fields: dict, clip: bytes | None = None) -> bytes:
    """What the API returns for the same multipart request as the page's."""
    files = {"init_audio": ("clip.wav", clip, "audio/wav")} if clip is not None else None
    with server.client() as c:
        r = c.post("/generate", data=fields, files=files)
    assert r.status_code == 200, r.text
    return r.content


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def page_audio(driver) -> bytes:
    audio = driver.execute_async_script(CHECK_AUDIO_JS)
    assert "error" not in audio, f"{audio['error']}\n{console(driver)}"
    return base64.b64decode(audio["base64"])


def open_page(driver, url: str) -> None:
    driver.get(url + "/")
    wait_for(driver, models_loaded, "the model list from GET /models")
    driver.execute_script(RECORD_REQUESTS_JS)


def choose_mode(driver, mode: str) -> None:
    Select(driver.find_element(By.ID, "mode")).select_by_value(mode)


def upload_clip(driver, path) -> None:
    driver.find_element(By.ID, "init_audio").send_keys(str(path))
    wait_for(driver, lambda d: " s, " in d.find_element(By.ID, "init-info").text, "the uploaded clip's preview")


def mode_options(driver) -> list[str]:
    return [o.get_attribute("value") for o in Select(driver.find_element(By.ID, "mode")).options]


def shown(driver, element_id: str) -> bool:
    return driver.find_element(By.ID, element_id).is_displayed()


def test_mode_picker_offers_only_the_models_modes(server, browser):
    with server.client() as c:
        listed = {m["name"]: m["modes"] for m in c.get("/models").json()}
    browser.get(server.url + "/")
    wait_for(browser, models_loaded, "the model list from GET /models")
    model = Select(browser.find_element(By.ID, "model"))
    for name in ("tiny", "tiny-arc"):
        model.select_by_value(name)
        assert mode_options(browser) == [m for m in ("text-to-audio", "audio-to-audio", "inpainting")
                                         if m in listed[name]]
        assert shown(browser, "negative_prompt") == ("negative-prompt" in listed[name])

    # What each mode shows: nothing more for text, the clip and its level, then the span too.
    assert not shown(browser, "init-box")
    choose_mode(browser, "audio-to-audio")
    assert shown(browser, "init-box") and shown(browser, "init_noise_level") and not shown(browser, "inpaint_start")
    assert browser.find_element(By.ID, "init_noise_level").get_attribute("value") == "0.6"
    assert not browser.find_element(By.ID, "use-last").is_enabled()  # nothing generated yet
    choose_mode(browser, "inpainting")
    assert shown(browser, "inpaint_start") and shown(browser, "inpaint_end")
    assert browser.find_element(By.ID, "init_noise_level").get_attribute("value") == "1"

    # Models listed with fewer modes: the picker offers only theirs, and falls back to text-to-audio.
    stub = {"tiny": ["text-to-audio", "audio-to-audio", "negative-prompt"], "tiny-arc": ["text-to-audio"]}
    script = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                                     {"source": STUB_MODES_JS % json.dumps(stub)})
    try:
        browser.get(server.url + "/")
        wait_for(browser, models_loaded, "the stubbed model list")
        model = Select(browser.find_element(By.ID, "model"))
        assert mode_options(browser) == ["text-to-audio", "audio-to-audio"]
        choose_mode(browser, "audio-to-audio")
        assert shown(browser, "init-box") and shown(browser, "negative_prompt")
        model.select_by_value("tiny-arc")
        assert mode_options(browser) == ["text-to-audio"]
        assert not browser.find_element(By.ID, "mode").is_enabled()
        assert not shown(browser, "init-box") and not shown(browser, "negative_prompt")
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": script["identifier"]})


def test_audio_to_audio_from_an_upload_then_from_the_last_result(server, browser, tmp_path):
    clip = write_clip(tmp_path / "clip.wav")
    open_page(browser, server.url)
    set_value(browser, "prompt", "a bell rings")
    set_value(browser, "steps", "3")
    set_value(browser, "seed", "11")
    choose_mode(browser, "audio-to-audio")
    upload_clip(browser, tmp_path / "clip.wav")
    assert "clip.wav" in browser.find_element(By.ID, "init-info").text
    assert browser.find_element(By.ID, "duration").get_attribute("value") == "1"  # fitted to the clip
    wait_for(browser, lambda d: d.execute_script(PIXEL_JS, "init-spectrogram", 0.5)[:3] != [34, 34, 34],
             "the clip's spectrogram")
    set_value(browser, "init_noise_level", "0.5")
    assert browser.find_element(By.ID, "level-slider").get_attribute("value") == "0.5"

    browser.find_element(By.ID, "generate").click()
    first_src = wait_for_audio(browser)
    first = page_audio(browser)
    sent = browser.execute_script("return window.sentForms")[-1]
    assert sent["multipart"] and sent["init_noise_level"] == "0.5"
    assert sent["init_audio"] == {"file": "clip.wav", "size": len(clip)}
    assert "inpaint_start" not in sent and "inpaint_end" not in sent
    fields = {"prompt": "a bell rings", "model": "tiny", "duration": "1", "steps": "3", "seed": "11",
              "format": "wav", "init_noise_level": "0.5"}
    assert sha(first) == sha(post_form(server, fields, clip))  # the server got the clip and the level
    assert sha(first) != sha(post_form(server, {**fields, "init_noise_level": "0.9"}, clip))

    # "Use the last result" starts the next run from the clip just generated.
    use_last = browser.find_element(By.ID, "use-last")
    assert use_last.is_enabled()
    use_last.click()
    wait_for(browser, lambda d: "a-bell-rings-seed11.wav" in d.find_element(By.ID, "init-info").text
             and " s, " in d.find_element(By.ID, "init-info").text, "the last result as the init clip")
    set_value(browser, "init_noise_level", "0.3")
    browser.find_element(By.ID, "generate").click()
    wait_for_audio(browser, first_src)
    second = page_audio(browser)
    sent = browser.execute_script("return window.sentForms")[-1]
    assert sent["init_audio"] == {"file": "a-bell-rings-seed11.wav", "size": len(first)}
    assert sent["init_noise_level"] == "0.3"
    assert sha(second) == sha(post_form(server, {**fields, "init_noise_level": "0.3"}, first))


def test_inpainting_span_marked_by_dragging_on_the_spectrogram(server, browser, tmp_path):
    clip = write_clip(tmp_path / "clip.wav", freq=300.0)
    open_page(browser, server.url)
    set_value(browser, "prompt", "thunder")
    set_value(browser, "steps", "3")
    set_value(browser, "seed", "5")
    choose_mode(browser, "inpainting")
    upload_clip(browser, tmp_path / "clip.wav")
    set_value(browser, "duration", "2")  # one second past the clip: the span may outpaint

    canvas = browser.find_element(By.ID, "init-spectrogram")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    width = canvas.rect["width"]
    # From a quarter to three quarters of the 2 s timeline (offsets are from the canvas's centre).
    ActionChains(browser).move_to_element_with_offset(canvas, -round(width / 4), 0).click_and_hold() \
        .move_by_offset(round(width / 4), 5).move_by_offset(round(width / 4), 0).release().perform()
    start = float(browser.find_element(By.ID, "inpaint_start").get_attribute("value"))
    end = float(browser.find_element(By.ID, "inpaint_end").get_attribute("value"))
    assert abs(start - 0.5) <= 0.02 and abs(end - 1.5) <= 0.02, (start, end)
    info = browser.find_element(By.ID, "span-info").text
    assert f"{start:.2f}-{end:.2f} s" in info and "outpainting" in info, info
    # The span is highlighted: past the clip's end, inside it (1.25 s) differs from outside it (1.75 s).
    inside, outside = (browser.execute_script(PIXEL_JS, "init-spectrogram", x) for x in (0.625, 0.875))
    assert outside[:3] == [34, 34, 34] and inside[:3] != outside[:3], (inside, outside)

    set_value(browser, "inpaint_end", "1.6")  # the numbers stay editable
    assert "-1.60 s" in browser.find_element(By.ID, "span-info").text
    browser.find_element(By.ID, "generate").click()
    wait_for_audio(browser)
    audio = page_audio(browser)
    sent = browser.execute_script("return window.sentForms")[-1]
    assert sent["multipart"] and (sent["inpaint_start"], sent["inpaint_end"]) == (f"{start:.2f}", "1.6")
    fields = {"prompt": "thunder", "model": "tiny", "duration": "2", "steps": "3", "seed": "5", "format": "wav",
              "init_noise_level": "1", "inpaint_start": f"{start:.2f}", "inpaint_end": "1.6"}
    assert sha(audio) == sha(post_form(server, fields, clip))
    decoded = browser.execute_async_script(CHECK_AUDIO_JS)["decoded"]
    assert decoded["length"] == 2 * SR


def test_bad_level_and_span_show_the_api_error(server, browser, tmp_path):
    write_clip(tmp_path / "clip.wav")
    open_page(browser, server.url)
    set_value(browser, "prompt", "a bell")
    set_value(browser, "steps", "2")
    error = browser.find_element(By.ID, "error")

    def expect_error(field: str, words: str) -> None:
        browser.find_element(By.ID, "generate").click()
        wait_for(browser, lambda d: error.is_displayed() and words in error.text, f"an error saying {words!r}")
        assert "422" in error.text and "invalid_input" in error.text, error.text
        assert browser.find_element(By.ID, field).get_attribute("aria-invalid") == "true"

    choose_mode(browser, "audio-to-audio")
    browser.find_element(By.ID, "generate").click()  # no clip yet: the page says so itself
    wait_for(browser, lambda d: "upload one or use the last result" in error.text, "the missing clip")
    upload_clip(browser, tmp_path / "clip.wav")
    set_value(browser, "init_noise_level", "0")
    expect_error("init_noise_level", "init_noise_level: Input should be greater than 0")
    set_value(browser, "init_noise_level", "1.5")
    expect_error("init_noise_level", "less than or equal to 1")

    choose_mode(browser, "inpainting")
    set_value(browser, "inpaint_start", "0.8")
    set_value(browser, "inpaint_end", "0.4")
    expect_error("inpaint_end", "must be after inpaint_start")
    set_value(browser, "inpaint_end", "3")
    expect_error("inpaint_end", "after the clip's 1.0 s")

    choose_mode(browser, "text-to-audio")
    Select(browser.find_element(By.ID, "model")).select_by_value("tiny-arc")  # guidance 1: no negative prompt
    set_value(browser, "negative_prompt", "a siren")
    expect_error("negative_prompt", "guidance other than 1")
    assert browser.execute_script("return window.sentForms.every((f) => f.multipart)")
