"""The chat page in headless Chromium: upload a photo, ask, watch the answer stream in.

Needs the `chromium` and `chromium-driver` system packages (apt-get install -y chromium
chromium-driver) and `selenium` from PyPI; skipped with the reason when they are missing.
"""
import shutil
import threading

import pytest
from PIL import Image

from llava_jax.infer.prompting import ChatModel
from llava_jax.infer.server import make_server
from llava_jax.testing.checkpoints import expected_answer, shared_tiny_checkpoint

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="headless Chromium not available: apt-get install -y chromium chromium-driver")


@pytest.fixture(scope="module")
def page_server():
    ckpt = shared_tiny_checkpoint()
    srv = make_server(ChatModel.load(ckpt), "127.0.0.1", 0, "tiny-llava", batch_window_s=0.01)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield ckpt, f"http://127.0.0.1:{srv.server_address[1]}/"
    srv.shutdown()
    srv.service.scheduler.close()
    srv.server_close()


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_upload_photo_ask_and_see_streamed_answer(page_server, browser, tmp_path):
    import skimage.data
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ckpt, url = page_server
    path = str(tmp_path / "chelsea.png")
    Image.fromarray(skimage.data.chelsea()).resize((90, 60)).save(path)
    browser.get(url)
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny-llava")
    browser.find_element(By.ID, "image-input").send_keys(path)
    wait.until(lambda d: d.find_element(By.ID, "preview").get_attribute("src").startswith("data:image/png"))
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")
    max_tokens = browser.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("16")
    browser.find_element(By.ID, "prompt").send_keys("What is shown in the image?")
    browser.find_element(By.ID, "send").click()

    bubble = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".message.assistant, .message.error"))
    wait.until(lambda d: bubble.get_attribute("data-state") in ("done", "error"))
    assert bubble.get_attribute("data-state") == "done", bubble.text
    # The answer arrived in several server-sent events and is the model's greedy answer.
    assert int(bubble.get_attribute("data-chunks")) > 1
    shown = browser.execute_script("return arguments[0].querySelector('.text').textContent", bubble)
    assert shown == expected_answer(ckpt, "What is shown in the image?", Image.open(path), max_new_tokens=16)
    assert browser.find_element(By.CSS_SELECTOR, ".message.user img").get_attribute("src").startswith("data:")
