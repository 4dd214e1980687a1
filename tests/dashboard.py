#!/usr/bin/env python3
"""Drives the dashboard page (/ui) in a real headless Chromium through chromedriver (Selenium)
for tests/dashboard.rs, and prints what it saw as one JSON object on stdout; the Rust test
checks it. Never asserts itself: a step that times out is reported with the page's text.

Usage: dashboard.py SCENARIO --url http://127.0.0.1:PORT [--token T]
Scenarios:
  view    the workers, counts, cron and Kafka panels; then clicks Pause
  token   the token form: nothing shown before, a wrong token refused, the right one works
  tasks   the task list, search, a task's detail, retry, cancel and retry-all
"""
import argparse
import json
import sys
import tempfile
import time

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Without the background-networking flags a closed network refuses Chromium's own connections.
FLAGS = ("--headless --no-sandbox --disable-gpu --disable-quic --no-first-run "
         "--disable-background-networking --disable-component-update --disable-sync "
         "--disable-dev-shm-usage --window-size=1280,900").split()

report = {"steps": []}


def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for f in FLAGS:
        opts.add_argument(f)
    opts.add_argument("--user-data-dir=" + tempfile.mkdtemp(prefix="poulpe-chromium-"))
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def wait(d, what, cond, limit=15):
    """Waits for cond(d) to be truthy; records the step, or its timeout with the page text."""
    try:
        v = WebDriverWait(d, limit, poll_frequency=0.1).until(lambda _: cond(d))
        report["steps"].append(what)
        return v
    except TimeoutException:
        report["timeout"] = what
        report["page"] = d.find_element(By.TAG_NAME, "body").text
        raise


# Read in one script call: a refresh cannot replace the elements halfway through.
def texts(d, css):
    return d.execute_script("return [...document.querySelectorAll(arguments[0])].map(e => e.innerText)", css)


def rows(d, css):
    return d.execute_script("return [...document.querySelectorAll(arguments[0])]"
                            ".map(tr => [...tr.querySelectorAll('td')].map(td => td.innerText))", css)


def listed(d):
    """{id: state} of the task list's rows."""
    return d.execute_script("const o = {}; for (const tr of document.querySelectorAll('#tasks tr[data-id]'))"
                            " o[tr.dataset.id] = tr.dataset.state; return o")


def shown(d, id_):
    return d.find_element(By.ID, id_).is_displayed()


def injected(d):
    """What an injected script or tag would leave: img elements, and window.__xss."""
    return {"imgs": len(d.find_elements(By.TAG_NAME, "img")),
            "xss": d.execute_script("return window.__xss === undefined ? null : String(window.__xss)")}


def click(d, css):
    """Clicks the element `css` names, again if a refresh replaced it meanwhile."""
    for _ in range(5):
        try:
            return d.find_element(By.CSS_SELECTOR, css).click()
        except StaleElementReferenceException:
            time.sleep(0.2)
    raise RuntimeError("kept being replaced: " + css)


def msg(d):
    return wait(d, "a message", lambda d: d.find_element(By.ID, "msg").text or None)


def view(d, a):
    d.get(a.url + "/ui")
    wait(d, "workers listed", lambda d: rows(d, "#workers tr"))
    # Three refreshes: the chart has rates to draw.
    first = d.find_element(By.ID, "stat").text
    wait(d, "refreshed", lambda d: d.find_element(By.ID, "stat").text != first, 10)
    report["workers"] = rows(d, "#workers tr")
    report["counts"] = texts(d, "#counts div")
    report["cron"] = rows(d, "#cron tr")
    report["kafka"] = d.find_element(By.ID, "kafka").text
    report["store"] = d.find_element(By.ID, "store").text
    report["header"] = d.find_element(By.TAG_NAME, "header").text
    report["polylines"] = len(d.find_elements(By.CSS_SELECTOR, "#chart polyline"))
    report["tasks"] = d.find_element(By.ID, "tasks").text
    report["login_shown"] = shown(d, "login")
    report.update(injected(d))
    d.find_element(By.ID, "pp").click()
    wait(d, "paused shown", lambda d: d.find_element(By.ID, "pz").text == "paused")
    report["after_pause"] = {"badge": d.find_element(By.ID, "pz").text,
                             "button": d.find_element(By.ID, "pp").text}


def token(d, a):
    d.get(a.url + "/ui")
    wait(d, "token form", lambda d: shown(d, "login"))
    time.sleep(2.5)  # a refresh would have come by now
    report["before"] = {"app_shown": shown(d, "app"), "text": d.find_element(By.TAG_NAME, "body").text,
                        "workers": len(rows(d, "#workers tr"))}
    box = d.find_element(By.ID, "tok")
    box.send_keys("not-" + a.token)
    box.submit()
    wait(d, "wrong token refused", lambda d: d.find_element(By.ID, "lmsg").text)
    report["wrong"] = {"lmsg": d.find_element(By.ID, "lmsg").text, "app_shown": shown(d, "app"),
                       "login_shown": shown(d, "login"), "text": d.find_element(By.TAG_NAME, "body").text}
    box = d.find_element(By.ID, "tok")
    box.send_keys(a.token)
    box.submit()
    wait(d, "workers after the token", lambda d: rows(d, "#workers tr"))
    report["right"] = {"workers": rows(d, "#workers tr"), "login_shown": shown(d, "login"),
                       "url": d.current_url,
                       "stored": d.execute_script("return sessionStorage.getItem('poulpe.token')")}
    d.refresh()
    wait(d, "workers after a reload", lambda d: rows(d, "#workers tr"))
    report["reload"] = {"login_shown": shown(d, "login")}
    # A token that stops working (changed on the server) makes the page ask again.
    d.execute_script("sessionStorage.setItem('poulpe.token', 'stale')")
    d.refresh()
    wait(d, "token form after a 401", lambda d: shown(d, "login"))
    report["stale"] = {"app_shown": shown(d, "app"), "workers": len(rows(d, "#workers tr")),
                       "lmsg": d.find_element(By.ID, "lmsg").text}


def row_state(d, id_):
    return listed(d).get(id_)


def tasks(d, a):
    d.get(a.url + "/ui")
    wait(d, "tasks listed", lambda d: row_state(d, "ok-1") and row_state(d, "dead-1") and row_state(d, "later-1"))
    report["list"] = rows(d, "#tasks tr[data-id]")
    report["states"] = {i: row_state(d, i) for i in ("ok-1", "dead-1", "later-1")}
    report["list_injected"] = injected(d)
    q = d.find_element(By.ID, "q")
    q.send_keys("ok-")
    wait(d, "search applied", lambda d: list(listed(d)) == ["ok-1"])
    q.clear()
    q.send_keys(" ")  # an input event: the search box is empty again
    wait(d, "search cleared", lambda d: row_state(d, "dead-1"))
    click(d, "#tasks tr[data-id='dead-1'] button.link")
    wait(d, "detail shown", lambda d: d.find_elements(By.CSS_SELECTOR, "#dbody table"))
    report["detail"] = {"title": d.find_element(By.ID, "dtitle").text,
                        "text": d.find_element(By.ID, "dbody").text, **injected(d)}
    click(d, "#dacts button.retry")
    report["retry_msg"] = msg(d)
    d.find_element(By.ID, "dclose").click()
    d.execute_script("document.getElementById('msg').textContent = ''")
    wait(d, "later-1 listed", lambda d: row_state(d, "later-1") == "delayed")
    click(d, "#tasks tr[data-id='later-1'] button.cancel")
    report["cancel_msg"] = msg(d)
    d.execute_script("document.getElementById('msg').textContent = ''")
    d.find_element(By.ID, "retryall").click()
    WebDriverWait(d, 5).until(lambda d: d.switch_to.alert).accept()
    report["retry_all_msg"] = msg(d)
    report["end_injected"] = injected(d)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=["view", "token", "tasks"])
    p.add_argument("--url", required=True)
    p.add_argument("--token", default="")
    a = p.parse_args()
    d = browser()
    ok = False
    try:
        {"view": view, "token": token, "tasks": tasks}[a.scenario](d, a)
        ok = True
    except Exception as e:  # reported to the Rust test, which fails with it
        report["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        report.setdefault("page", d.find_element(By.TAG_NAME, "body").text)
    finally:
        d.quit()
    report["ok"] = ok
    print(json.dumps(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
