"""The page's best-of option in Chromium: it sends best_of/rank and lists the ranked samples,
best first, with their scores (the job body is stubbed; test_server_bestof checks the real one)."""

from __future__ import annotations

from playwright.sync_api import Page

from test_webpage import (  # noqa: F401  (fixtures and the module's skip/slow mark)
    FAKE_ID, LiveServer, browser, engine, laptop, pytestmark, server, stub_sample_job, wait_for_server_limits,
)


def test_best_of_sends_the_ranking_and_lists_the_scores_best_first(server: LiveServer, laptop: Page) -> None:
    page = laptop
    base = f"/v1/generations/{FAKE_ID}"
    seeds = [40, 41, 42]
    results = [{"seed": s, "audio_url": f"{base}/audio?seed={s}", "video_url": None} for s in seeds]
    # 42 won on DeSync, 40 is second; audio_url is the kept one's, as the server answers.
    scores = {40: (0.12, 0.301, 2), 41: (0.48, 0.455, 3), 42: (0.04, 0.212, 1)}
    candidates = sorted(
        ({"seed": s, "desync": d, "offsets_sec": [d, d], "clap": c, "rank": r, "kept": r == 1,
          "audio_url": f"{base}/audio?seed={s}"} for s, (d, c, r) in scores.items()),
        key=lambda c: c["rank"])
    job = {
        "id": FAKE_ID, "status": "succeeded", "progress": {"step": 2, "total": 2}, "prompt": "rain", "seed": 40,
        "output": "wav", "cache_hit": False, "timings": {"score": 0.2}, "warnings": [], "num_samples": 3,
        "text_only": True, "audio_url": f"{base}/audio?seed=42", "video_url": None, "results": results,
        "expired": False, "best_of": 3, "rank": "desync,clap", "ranked_by": ["desync", "clap"], "candidates": candidates,
    }
    posted = stub_sample_job(page, job)
    page.goto(server.url + "/")
    wait_for_server_limits(page)
    assert page.locator("[data-testid=best-of-field]").is_visible()
    page.check("[data-testid=mode-text]")
    page.fill("[data-testid=seed]", "40")
    page.check("[data-testid=best-of]")
    page.fill("[data-testid=num-samples]", "1")  # nothing to rank: refused in the page
    page.click("[data-testid=generate]")
    page.wait_for_function("document.querySelector('[data-testid=alert-message]').textContent.startsWith('Samples')")
    assert posted == []

    page.fill("[data-testid=num-samples]", "3")
    page.click("[data-testid=generate]")
    page.wait_for_selector("[data-testid=sample] >> nth=2")
    sent = posted[0]
    assert 'name="best_of"\r\n\r\n3' in sent and 'name="rank"\r\n\r\ndesync,clap' in sent and 'name="num_samples"' not in sent

    items = page.locator("[data-testid=sample]")
    assert [items.nth(k).get_attribute("data-seed") for k in range(3)] == ["42", "40", "41"]  # by rank
    assert [items.nth(k).get_attribute("data-rank") for k in range(3)] == ["1", "2", "3"]
    first = items.nth(0).locator("[data-testid=sample-scores]").inner_text()
    assert "best" in first.lower() and "DeSync 0.04" in first and "CLAP 0.212" in first
    assert page.locator("[data-testid=sample-best]").count() == 1
    assert "DeSync 0.48" in items.nth(2).inner_text() and "CLAP 0.455" in items.nth(2).inner_text()
    # the kept one is the result shown above, and the seed it reuses
    assert items.nth(0).get_attribute("data-picked") == "true"
    page.wait_for_function("document.querySelector('[data-testid=download-main]').download.includes('seed42')")
    meta = page.locator("[data-testid=result-meta]").inner_text()
    assert "42" in meta and "DeSync (lower is better), then CLAP" in meta
    items.nth(1).locator("[data-testid=sample-pick]").click()
    page.wait_for_function("document.querySelector('[data-testid=download-main]').download.includes('seed40')")
    assert page.errors == []  # type: ignore[attr-defined]
