// ImageGenX playground: submit a request, follow its progress, show the images.
// Talks to the public REST API only (POST /api/v1/images, GET/DELETE /api/v1/tasks/<id>,
// and the task's server-sent events, GET /api/v1/tasks/<id>/events, read with fetch so the
// API key goes in a header; polling when the server has no event stream).
"use strict";

(() => {
  const KEY_STORE = "imagegenx.apiKey";
  const GALLERY_STORE = "imagegenx.gallery";
  const GALLERY_MAX = 24;
  const POLL_MS = 250;
  const RETRY_MS = 1000;
  const FINAL = ["SUCCESS", "FAILURE", "REVOKED"];
  const FINAL_EVENTS = ["succeeded", "failed", "revoked"];
  const NO_STREAM = [404, 405, 501, 503];
  const FIELDS = ["api_key", "prompt", "negative_prompt", "width", "height", "steps",
                  "guidance_scale", "guidance_interval", "sampler", "seed", "num_images"];
  const STATE_TEXT = {
    PENDING: "queued",
    RECEIVED: "waiting for its batch",
    STARTED: "started",
    PROGRESS: "denoising",
    SUCCESS: "done",
    FAILURE: "failed",
    REVOKED: "cancelled",
    RETRY: "retrying",
  };

  const $ = (id) => document.getElementById(id);
  const form = $("generate-form");
  const keyInput = $("api-key");
  const submitButton = $("submit");
  const cancelButton = $("cancel");
  const submitUrl = form.dataset.submitUrl;
  const taskUrl = (id) => form.dataset.taskUrl.replace("TASK_ID", encodeURIComponent(id));
  let current = null; // the task being followed: {taskId, seed, key, params}

  // -- storage (may be unavailable, e.g. with storage disabled) -------------
  function load(name, fallback) {
    try {
      const raw = window.localStorage.getItem(name);
      return raw === null ? fallback : JSON.parse(raw);
    } catch (err) {
      return fallback;
    }
  }

  function save(name, value) {
    try {
      if (value === null) window.localStorage.removeItem(name);
      else window.localStorage.setItem(name, JSON.stringify(value));
    } catch (err) {
      // Not kept; the page still works.
    }
  }

  // The key field has no name, so it never travels in a form submission.
  const control = (name) => (name === "api_key" ? keyInput : form.elements[name]);

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (name === "text") node.textContent = value;
      else node.setAttribute(name, value);
    }
    node.append(...children);
    return node;
  }

  // -- errors ------------------------------------------------------------------
  function clearErrors() {
    for (const name of FIELDS) {
      $(`err-${name}`).textContent = "";
      const input = control(name);
      if (input) input.removeAttribute("aria-invalid");
    }
    const banner = $("banner");
    banner.hidden = true;
    banner.replaceChildren();
  }

  function fieldError(name, reason) {
    const slot = $(`err-${name}`);
    if (!slot) return false;
    slot.textContent = slot.textContent ? `${slot.textContent}; ${reason}` : reason;
    const input = control(name);
    if (input) input.setAttribute("aria-invalid", "true");
    return true;
  }

  function showBanner(title, lines = []) {
    const banner = $("banner");
    banner.replaceChildren(el("strong", { text: title }));
    if (lines.length) banner.append(el("ul", {}, ...lines.map((line) => el("li", { text: line }))));
    banner.hidden = false;
  }

  function showApiError(status, body) {
    const message = (body && body.error) || `HTTP ${status}`;
    if (status === 401) {
      fieldError("api_key", message);
      showBanner("The API key was refused.");
      return;
    }
    if (status === 422 && Array.isArray(body.fields)) {
      const other = [];
      for (const { field, reason } of body.fields) {
        if (!fieldError(field, reason)) other.push(`${field}: ${reason}`);
      }
      showBanner("Please correct the highlighted fields.", other);
      const first = form.querySelector("[aria-invalid=true]");
      if (first) first.focus();
      return;
    }
    showBanner(`The server answered ${status}.`, [message]);
  }

  // -- the form ----------------------------------------------------------------
  function readParams() {
    const params = { prompt: form.elements.prompt.value };
    for (const name of ["negative_prompt", "sampler"]) {
      const value = form.elements[name].value;
      if (value !== "") params[name] = value;
    }
    for (const name of ["width", "height", "steps", "guidance_scale", "seed", "num_images"]) {
      const raw = form.elements[name].value.trim();
      if (raw === "") continue;
      const value = Number(raw);
      params[name] = Number.isFinite(value) ? value : raw; // the server names bad values
    }
    const interval = form.elements.guidance_interval.value.trim();
    if (interval !== "") {
      const parts = interval.replace(/[\[\]\s]/g, "").split(",").map(Number);
      params.guidance_interval = parts.every(Number.isFinite) ? parts : interval;
    }
    return params;
  }

  function fillForm(params) {
    for (const name of FIELDS) {
      if (name === "api_key" || !(name in params)) continue;
      const value = params[name];
      form.elements[name].value = Array.isArray(value) ? value.join(",") : value;
    }
  }

  async function call(method, path, key, body) {
    const headers = { "X-API-Key": key, Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const resp = await fetch(path, {
      method, headers, cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    let data = {};
    try {
      data = await resp.json();
    } catch (err) {
      data = { error: resp.statusText };
    }
    return { status: resp.status, data, retryAfter: resp.headers.get("Retry-After") };
  }

  async function onSubmit(event) {
    event.preventDefault();
    clearErrors();
    const key = keyInput.value.trim();
    if (!key) {
      fieldError("api_key", "enter your API key");
      keyInput.focus();
      return;
    }
    save(KEY_STORE, key);
    const params = readParams();
    submitButton.disabled = true;
    let answer;
    try {
      answer = await call("POST", submitUrl, key, params);
    } catch (err) {
      submitButton.disabled = false;
      showBanner("Cannot reach the API.", [String(err.message || err)]);
      return;
    }
    if (answer.status !== 202) {
      submitButton.disabled = false;
      showApiError(answer.status, answer.data);
      return;
    }
    const task = { taskId: answer.data.task_id, seed: answer.data.seed, key, params };
    follow(task);
  }

  // -- progress ----------------------------------------------------------------
  function showStatus(task, state, progress, note) {
    $("status").hidden = false;
    $("empty").hidden = true;
    const label = $("task-state");
    label.textContent = state;
    label.dataset.state = state;
    const bar = $("progress");
    let detail = STATE_TEXT[state] || "";
    if (progress && progress.total) {
      bar.max = progress.total;
      bar.value = Math.min(progress.step || 0, progress.total);
      detail += ` · step ${progress.step || 0} / ${progress.total}`;
    } else if (state === "SUCCESS") {
      bar.max = 1;
      bar.value = 1;
    } else if (FINAL.includes(state)) {
      bar.max = 1;
      bar.value = 0;
    } else {
      bar.removeAttribute("value"); // indeterminate while queued
    }
    $("task-detail").textContent = note ? `${detail} (${note})` : detail;
    $("task-id").textContent = task.taskId;
    $("task-seed").textContent = String(task.seed);
  }

  function begin(task) {
    current = task;
    $("result").replaceChildren();
    $("preview").hidden = true;
    cancelButton.hidden = false;
    cancelButton.disabled = false;
    showStatus(task, "PENDING", null);
  }

  // The task's final status (what GET /api/v1/tasks/<id> answers): result or reason.
  function conclude(task, status) {
    showStatus(task, status.state, status.progress);
    finish(task);
    $("preview").hidden = true;
    if (status.state === "SUCCESS") {
      const entry = {
        task_id: task.taskId, seed: task.seed, params: task.params, created: Date.now(),
        images: status.result.images, batch: status.result.batch,
        timings: status.result.timings,
      };
      showResult(entry);
      remember(entry);
    } else if (status.state === "REVOKED") {
      const reason = (status.error && status.error.message) || "";
      if (reason === "expired") showBanner("The request expired before it ran (timeout_s).");
      else if (!task.cancelled) showBanner("The task was revoked.", reason ? [reason] : []);
    } else {
      const err = status.error || {};
      showBanner("The generation failed.",
                 [[err.type, err.message].filter(Boolean).join(": ") || "no reason given"]);
    }
  }

  function queuedNote(data) {
    if (data.position == null) return data.where === "worker" ? "at a worker, waiting for a free row" : "";
    let note = `place ${data.position} of ${data.queue_depth}`;
    if (data.estimate_s != null) note += ` · about ${Math.ceil(data.estimate_s)} s`;
    return note;
  }

  function showEvent(task, name, data) {
    if (name === "queued") {
      showStatus(task, data.state === "RECEIVED" ? "RECEIVED" : "PENDING", null, queuedNote(data));
    } else if (name === "started") {
      showStatus(task, "STARTED", null);
    } else if (name === "progress") {
      showStatus(task, "PROGRESS", data);
    } else if (name === "preview" && data.png_base64) {
      const img = $("preview");
      img.src = `data:image/png;base64,${data.png_base64}`;
      img.alt = `preview at step ${data.step}`;
      img.hidden = false;
    }
  }

  // Parse "text/event-stream" blocks out of the decoded text; returns the unparsed rest.
  function parseEvents(text, onEvent) {
    const blocks = text.split(/\r?\n\r?\n/);
    const rest = blocks.pop();
    for (const block of blocks) {
      let name = "message", id = null;
      const data = [];
      for (const line of block.split(/\r?\n/)) {
        if (!line || line.startsWith(":")) continue;
        const at = line.indexOf(":");
        const field = at < 0 ? line : line.slice(0, at);
        let value = at < 0 ? "" : line.slice(at + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "event") name = value;
        else if (field === "id") id = value;
        else if (field === "data") data.push(value);
      }
      if (data.length) onEvent(name, id, JSON.parse(data.join("\n")));
    }
    return rest;
  }

  // Follow the task's event stream; resume with Last-Event-ID when the connection
  // drops; fall back to polling when the server has no stream.
  async function follow(task) {
    begin(task);
    const path = `${taskUrl(task.taskId)}/events`;
    let lastId = null;
    let failures = 0;
    while (current === task) {
      const headers = { "X-API-Key": task.key, Accept: "text/event-stream" };
      if (lastId) headers["Last-Event-ID"] = lastId;
      let resp;
      try {
        resp = await fetch(path, { headers, cache: "no-store" });
      } catch (err) {
        if (++failures > 5) return poll(task);
        showStatus(task, $("task-state").textContent, null, "connection lost, retrying");
        await sleep(RETRY_MS);
        continue;
      }
      if (resp.status === 204) return poll(task); // the final event was delivered: read it
      const type = resp.headers.get("Content-Type") || "";
      if (NO_STREAM.includes(resp.status) || (resp.ok && !type.startsWith("text/event-stream")) ||
          !resp.body) {
        return poll(task);
      }
      if (!resp.ok) {
        let data = {};
        try { data = await resp.json(); } catch (err) { data = { error: resp.statusText }; }
        if (resp.status === 429) {
          await sleep(Math.max(RETRY_MS, 1000 * (Number(resp.headers.get("Retry-After")) || 0)));
          continue;
        }
        finish(task);
        showApiError(resp.status, data);
        return;
      }
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      let final = null;
      try {
        while (current === task && final === null) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer = parseEvents(buffer + decoder.decode(value, { stream: true }), (name, id, data) => {
            failures = 0;
            if (id) lastId = id;
            if (FINAL_EVENTS.includes(name)) final = data;
            else if (final === null) showEvent(task, name, data);
          });
        }
      } catch (err) {
        failures += 1;
      } finally {
        reader.cancel().catch(() => {});
      }
      if (final !== null) {
        if (current === task) conclude(task, final);
        return;
      }
      if (failures > 5) return poll(task);
      // Closed without the final event (the server's stream limit): resume after lastId.
    }
  }

  // Polling: GET the task until it ends.
  async function poll(task) {
    const path = taskUrl(task.taskId);
    while (current === task) {
      let answer;
      try {
        answer = await call("GET", path, task.key);
      } catch (err) {
        showStatus(task, $("task-state").textContent, null, "connection lost, retrying");
        await sleep(RETRY_MS);
        continue;
      }
      if (answer.status === 503 || answer.status === 429) { // busy: wait as told, then poll again
        await sleep(Math.max(RETRY_MS, 1000 * (Number(answer.retryAfter) || 0)));
        continue;
      }
      if (answer.status !== 200) {
        finish(task);
        showApiError(answer.status, answer.data);
        return;
      }
      const status = answer.data;
      if (FINAL.includes(status.state)) {
        conclude(task, status);
        return;
      }
      showStatus(task, status.state, status.progress);
      await sleep(POLL_MS);
    }
  }

  function finish(task) {
    if (current === task) current = null;
    submitButton.disabled = false;
    cancelButton.hidden = true;
  }

  async function onCancel() {
    const task = current;
    if (!task) return;
    cancelButton.disabled = true;
    task.cancelled = true;
    try {
      const answer = await call("DELETE", taskUrl(task.taskId), task.key);
      if (answer.status !== 202 && answer.status !== 409) showApiError(answer.status, answer.data);
    } catch (err) {
      showBanner("Cannot reach the API.", [String(err.message || err)]);
    }
  }

  // -- results and gallery -----------------------------------------------------
  function showResult(entry) {
    $("empty").hidden = true;
    const figures = entry.images.map((image) => {
      const img = el("img", {
        src: image.url, width: String(image.width), height: String(image.height),
        alt: entry.params.prompt || "generated image",
      });
      return el("figure", {},
        el("a", { href: image.url, target: "_blank", rel: "noopener" }, img),
        el("figcaption", { text: `seed ${image.seed} · ${image.width}×${image.height}` }));
    });
    const notes = [];
    const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
    if (entry.batch) {
      notes.push(`ran in a batch of ${plural(entry.batch.size, "image")} from ${plural(entry.batch.requests, "request")}`);
    }
    if (entry.timings && typeof entry.timings.engine_s === "number") {
      notes.push(`engine ${entry.timings.engine_s.toFixed(2)} s`);
    }
    const prompt = el("p", { class: "prompt", text: entry.params.prompt || "" });
    $("result").replaceChildren(prompt, el("div", { class: "images" }, ...figures),
                                el("p", { class: "meta", text: notes.join(" · ") }));
  }

  function remember(entry) {
    const gallery = load(GALLERY_STORE, []).filter((e) => e.task_id !== entry.task_id);
    gallery.unshift(entry);
    save(GALLERY_STORE, gallery.slice(0, GALLERY_MAX));
    renderGallery();
  }

  function renderGallery() {
    const gallery = load(GALLERY_STORE, []);
    const items = gallery.filter((e) => e && Array.isArray(e.images) && e.images.length).map((entry) => {
      const first = entry.images[0];
      const img = el("img", { src: first.thumbnail_url || first.url, alt: entry.params.prompt || "" });
      img.addEventListener("error", () => img.classList.add("missing"));
      const button = el("button", { type: "button", class: "thumb", title: entry.params.prompt || "" }, img);
      if (entry.images.length > 1) button.append(el("span", { class: "count", text: `×${entry.images.length}` }));
      button.addEventListener("click", () => {
        if (current) return;
        clearErrors();
        $("status").hidden = true;
        fillForm({ ...entry.params, seed: entry.seed });
        showResult(entry);
      });
      return button;
    });
    $("gallery").replaceChildren(...items);
    $("clear-gallery").hidden = items.length === 0;
  }

  // -- wiring ------------------------------------------------------------------
  keyInput.value = load(KEY_STORE, "") || "";
  keyInput.addEventListener("change", () => save(KEY_STORE, keyInput.value.trim() || null));
  $("forget-key").addEventListener("click", () => {
    keyInput.value = "";
    save(KEY_STORE, null);
  });
  $("clear-gallery").addEventListener("click", () => {
    save(GALLERY_STORE, null);
    renderGallery();
  });
  form.addEventListener("submit", onSubmit);
  cancelButton.addEventListener("click", onCancel);
  for (const name of FIELDS) {
    // A changed field loses its old error; the others keep theirs until resubmitted.
    control(name).addEventListener("input", () => {
      $(`err-${name}`).textContent = "";
      control(name).removeAttribute("aria-invalid");
    });
  }
  renderGallery();
  submitButton.disabled = false; // the form only submits through this script
})();
