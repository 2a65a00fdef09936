// The furina-serve web page: catalog, merge jobs, streamed chat and latency comparison.
// Plain JavaScript without a build step. Every API call goes through apiRequest, which
// sends the API key from sessionStorage as "Authorization: Bearer <key>".
'use strict';

const KEY_STORAGE = 'furina-api-key';
const POLL_INTERVAL_MS = 250;
const FINISHED_STATES = new Set(['succeeded', 'failed', 'cancelled']);
const LATENCY_METRICS = [
  { key: 'time_to_first_token', chart: 'ttft-chart', caption: 'ttft-caption' },
  { key: 'decode_time_per_token', chart: 'decode-chart', caption: 'decode-caption' },
];

const byId = (id) => document.getElementById(id);

// ---- API access ------------------------------------------------------------------

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || '';
}

// Send a request and return the Response when its status is 2xx. Any other status
// throws ApiError with the API's own message.
async function apiRequest(path, { method = 'GET', body, signal } = {}) {
  const headers = { Accept: 'application/json' };
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';

  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    });
  } catch (error) {
    if (error.name === 'AbortError') throw error;
    throw new ApiError(`request to ${path} failed: ${error.message}`, 0);
  }
  if (!response.ok) {
    throw new ApiError(await errorMessage(response), response.status);
  }
  return response;
}

async function apiJson(path, options) {
  const response = await apiRequest(path, options);
  return response.json();
}

// The message of an error response: OpenAI's error.message, or FastAPI's detail (a
// string, or a list of validation errors), or the raw body.
async function errorMessage(response) {
  const text = await response.text();
  let body;
  try {
    body = JSON.parse(text);
  } catch {
    return `HTTP ${response.status}: ${text || response.statusText}`;
  }
  if (body && body.error && typeof body.error.message === 'string') {
    return body.error.message;
  }
  if (body && typeof body.detail === 'string') return body.detail;
  if (body && Array.isArray(body.detail)) {
    return body.detail.map(describeValidationError).join('; ');
  }
  return `HTTP ${response.status}: ${text}`;
}

function describeValidationError(item) {
  const location = (item.loc || []).filter((part) => part !== 'body').join('.');
  return location ? `${location}: ${item.msg}` : String(item.msg);
}

function showError(elementId, error) {
  const element = byId(elementId);
  if (error === null) {
    element.hidden = true;
    element.textContent = '';
    return;
  }
  const status = error instanceof ApiError && error.status ? ` (HTTP ${error.status})` : '';
  element.textContent = `${error.message}${status}`;
  element.hidden = false;
}

// ---- API key -----------------------------------------------------------------------

function showKeyStatus() {
  byId('key-status').textContent = apiKey()
    ? 'Key set for this tab: it is kept in session storage and sent with every API call.'
    : 'No key: requests are sent without one.';
}

function setUpKeyForm() {
  byId('api-key').value = apiKey();
  showKeyStatus();
  byId('key-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const key = byId('api-key').value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
    showKeyStatus();
    loadCatalog();
  });
  byId('forget-key').addEventListener('click', () => {
    sessionStorage.removeItem(KEY_STORAGE);
    byId('api-key').value = '';
    showKeyStatus();
  });
}

// ---- Catalog -----------------------------------------------------------------------

function formatBytes(bytes) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}

function resultBadge(passed) {
  const badge = document.createElement('span');
  badge.className = `result ${passed ? 'pass' : 'fail'}`;
  const symbol = document.createElement('span');
  symbol.setAttribute('aria-hidden', 'true');
  symbol.textContent = passed ? '✓ ' : '✗ ';
  badge.append(symbol, passed ? 'pass' : 'fail');
  return badge;
}

function reportSummary(report) {
  const summary = document.createElement('span');
  summary.className = 'item-detail';
  if (!report) {
    summary.textContent = 'no merge report';
    return summary;
  }
  summary.append('structure ');
  if (report.structure_passed === null) summary.append('unknown');
  else summary.append(resultBadge(report.structure_passed));
  if (!report.verified) {
    summary.append('; not verified');
    return summary;
  }
  const relative = report.max_rel_logit_diff_merged_vs_unmerged;
  if (relative !== null) {
    summary.append(`; max relative logit difference ${relative.toExponential(2)}`);
  }
  if (report.greedy_identical !== null) {
    summary.append('; greedy output ', resultBadge(report.greedy_identical));
  }
  return summary;
}

function renderList(listId, items, describe) {
  const list = byId(listId);
  list.replaceChildren();
  if (items.length === 0) {
    const empty = document.createElement('li');
    empty.className = 'empty';
    empty.textContent = 'none';
    list.append(empty);
    return;
  }
  for (const item of items) {
    const entry = document.createElement('li');
    const name = document.createElement('span');
    name.className = 'item-name';
    name.textContent = item.name;
    const size = document.createElement('span');
    size.className = 'item-detail';
    size.textContent = formatBytes(item.size_bytes);
    entry.append(name, size);
    if (describe) entry.append(describe(item));
    list.append(entry);
  }
}

// Replace a select's options, keeping the current choice when it is still offered.
function fillSelect(selectId, groups, preferred) {
  const select = byId(selectId);
  const previous = preferred || select.value;
  select.replaceChildren();
  for (const group of groups) {
    const parent = group.label ? document.createElement('optgroup') : select;
    if (group.label) {
      parent.label = group.label;
      select.append(parent);
    }
    for (const value of group.values) {
      parent.append(new Option(value, value));
    }
  }
  if ([...select.options].some((option) => option.value === previous)) select.value = previous;
}

async function loadCatalog(selectMerged) {
  showError('catalog-error', null);
  let base;
  let adapters;
  let merged;
  try {
    [base, adapters, merged] = await Promise.all([
      apiJson('/base-models'),
      apiJson('/adapters'),
      apiJson('/merged-models'),
    ]);
  } catch (error) {
    showError('catalog-error', error);
    return;
  }
  renderList('base-list', base);
  renderList('adapter-list', adapters);
  renderList('merged-list', merged, (item) => reportSummary(item.report));

  const mergedNames = merged.map((item) => item.name);
  const baseIds = base.map((item) => `base/${item.name}`);
  fillSelect('merge-base', [{ values: base.map((item) => item.name) }]);
  fillSelect('merge-adapter', [{ values: adapters.map((item) => item.name) }]);
  fillSelect(
    'chat-model',
    [{ label: 'Merged models', values: mergedNames }, { label: 'Base models', values: baseIds }],
    selectMerged,
  );
  fillSelect('latency-model', [{ values: mergedNames }], selectMerged);
}

// ---- Merge jobs --------------------------------------------------------------------

let activeJobId = null;

function showJobProgress(job) {
  const percent = Math.round(job.progress * 100);
  const progress = byId('merge-progress');
  progress.value = percent;
  progress.setAttribute('aria-valuenow', String(percent));
  const message = job.message ? `: ${job.message}` : '';
  progress.setAttribute('aria-valuetext', `${percent}% ${job.status}${message}`);

  byId('merge-job').dataset.state = job.status;
  byId('merge-progress-label').textContent = `Merge job ${job.id} (${job.name})`;
  let text = `${job.status}, ${percent}%${message}`;
  if (job.status === 'succeeded') text = `succeeded: ${job.output} written`;
  if (job.status === 'failed') text = 'failed';
  if (job.status === 'cancelled') text = 'cancelled: nothing was written';
  byId('merge-status').textContent = text;
}

function setMergeBusy(busy) {
  byId('merge-submit').disabled = busy;
  byId('merge-cancel').hidden = !busy;
  byId('merge-job').setAttribute('aria-busy', String(busy));
}

async function submitMerge(event) {
  event.preventDefault();
  showError('merge-error', null);
  byId('merge-report').hidden = true;
  const body = {
    base_model: byId('merge-base').value,
    adapter: byId('merge-adapter').value,
    name: byId('merge-name').value.trim(),
    dtype: byId('merge-dtype').value || null,
    verify: byId('merge-verify').checked,
  };

  setMergeBusy(true);
  let job;
  try {
    job = await apiJson('/merge', { method: 'POST', body });
  } catch (error) {
    showError('merge-error', error);
    setMergeBusy(false);
    return;
  }
  activeJobId = job.id;
  byId('merge-job').hidden = false;
  showJobProgress(job);
  await pollJob(job.id);
}

async function pollJob(jobId) {
  let job;
  for (;;) {
    try {
      job = await apiJson(`/merge/${encodeURIComponent(jobId)}`);
    } catch (error) {
      showError('merge-error', error);
      break;
    }
    showJobProgress(job);
    if (FINISHED_STATES.has(job.status)) break;
    await new Promise((resolve) => setTimeout(resolve, POLL_INTERVAL_MS));
  }
  activeJobId = null;
  setMergeBusy(false);
  if (!job) return;

  if (job.status === 'failed') {
    showError('merge-error', new Error(job.error || 'the merge job failed without an error'));
  }
  if (job.status === 'succeeded') {
    if (job.report) renderReport(job.report);
    await loadCatalog(job.name);
  }
}

async function cancelMerge() {
  if (!activeJobId) return;
  try {
    const job = await apiJson(`/merge/${encodeURIComponent(activeJobId)}`, { method: 'DELETE' });
    showJobProgress(job);
  } catch (error) {
    showError('merge-error', error);
  }
}

// ---- Merge report ------------------------------------------------------------------

function checkRow(name, passed, details) {
  const row = document.createElement('tr');
  const nameCell = document.createElement('th');
  nameCell.scope = 'row';
  nameCell.textContent = name;
  const resultCell = document.createElement('td');
  if (passed === null) resultCell.textContent = 'not run';
  else resultCell.append(resultBadge(passed));
  const detailCell = document.createElement('td');
  detailCell.textContent = details;
  row.append(nameCell, resultCell, detailCell);
  return row;
}

function listOrNone(values) {
  return values && values.length ? values.join(', ') : 'none';
}

function sameItems(left, right) {
  return JSON.stringify([...left].sort()) === JSON.stringify([...right].sort());
}

// Rows for the structural checks that decide merger.verify's structure["passed"].
function structureRows(structure) {
  const names = structure.names;
  const count = structure.tensor_count;
  const size = structure.index_total_size;
  const rows = [
    checkRow(
      'Tensor names',
      names.missing.length === 0 && sameItems(names.extra, names.expected_extra),
      `${count.base} tensors in the base, ${count.merged} merged; missing: ` +
        `${listOrNone(names.missing)}; extra: ${listOrNone(names.extra)}`,
    ),
    checkRow(
      'Shapes',
      structure.shapes.identical,
      structure.shapes.identical
        ? 'all as in the base'
        : `${structure.shapes.mismatched.length} tensors differ`,
    ),
    checkRow(
      'Dtypes',
      structure.dtypes.identical,
      `compared against ${structure.dtypes.compared_against}` +
        (structure.dtypes.identical ? '' : `; ${structure.dtypes.mismatched.length} differ`),
    ),
    checkRow('Shard files', structure.shards.identical, listOrNone(structure.shards.merged)),
    checkRow(
      'Index total size',
      size.correct,
      size.recorded === null ? 'single file, no index' : `recorded ${size.recorded} bytes, ` +
        `actual ${size.actual} bytes`,
    ),
    checkRow(
      'Config',
      structure.config.as_expected,
      `changed keys: ${listOrNone(structure.config.changed_keys)}`,
    ),
    checkRow(
      'Copied files',
      structure.files_copied.missing.length === 0,
      `missing: ${listOrNone(structure.files_copied.missing)}`,
    ),
    checkRow('All structural checks', structure.passed, structure.note || ''),
  ];
  return rows;
}

function numericalRows(numerical) {
  if (!numerical) {
    return [checkRow('Numerical check', null, 'the merge ran without verification')];
  }
  const relative = numerical.max_rel_logit_diff_merged_vs_unmerged;
  return [
    checkRow('Finite logits', numerical.logits_finite, 'every merged logit is finite'),
    checkRow(
      'Logits match the unmerged adapter',
      numerical.within_tolerance,
      `max relative difference ${relative.toExponential(2)}, ` +
        `tolerance ${numerical.relative_tolerance}`,
    ),
    checkRow(
      'Greedy output identical',
      numerical.greedy_identical,
      `${numerical.greedy_new_tokens} tokens on each of ${numerical.prompts.length} prompts`,
    ),
    checkRow(
      'Merged model differs from the base',
      numerical.merged_differs_from_base,
      `max absolute logit difference ` +
        `${numerical.max_abs_logit_diff_merged_vs_base.toPrecision(3)}`,
    ),
  ];
}

function renderReport(report) {
  byId('structure-checks').replaceChildren(...structureRows(report.structure));
  byId('numerical-checks').replaceChildren(...numericalRows(report.numerical));
  byId('merge-report').hidden = false;
}

// ---- Chat --------------------------------------------------------------------------

const conversation = [];
let chatAbort = null;

function addChatMessage(role, text) {
  const entry = document.createElement('li');
  entry.className = `chat-message ${role}`;
  const roleLabel = document.createElement('span');
  roleLabel.className = 'chat-role';
  roleLabel.textContent = role === 'user' ? 'You' : 'Model';
  const content = document.createElement('p');
  content.className = 'chat-content';
  content.textContent = text;
  entry.append(roleLabel, content);
  byId('chat-log').append(entry);
  return entry;
}

// Split Server-Sent Events text into events and call onData with each event's data field.
// Returns the unparsed rest, which is the start of an event that has not fully arrived.
function parseSseEvents(buffer, onData) {
  // A trailing "\r" may be the first half of a "\r\n" split across network chunks.
  const normalized = buffer.replace(/\r\n|\r(?!$)/g, '\n');
  const blocks = normalized.split('\n\n');
  const rest = blocks.pop();
  for (const block of blocks) {
    const data = block
      .split('\n')
      .filter((line) => line.startsWith('data:'))
      .map((line) => line.slice(5).replace(/^ /, ''))
      .join('\n');
    if (data) onData(data);
  }
  return rest;
}

async function streamChat(body, content, entry, signal) {
  const response = await apiRequest('/v1/chat/completions', { method: 'POST', body, signal });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  let done = false;
  let text = '';
  let chunks = 0;

  const handleData = (data) => {
    if (data === '[DONE]') {
      done = true;
      return;
    }
    const payload = JSON.parse(data);
    if (payload.error) throw new ApiError(payload.error.message, 0);
    const choice = payload.choices && payload.choices[0];
    const delta = choice && choice.delta && choice.delta.content;
    if (delta) {
      text += delta;
      chunks += 1;
      content.textContent = text;
      entry.dataset.chunks = String(chunks);
    }
    if (choice && choice.finish_reason) entry.dataset.finishReason = choice.finish_reason;
  };

  try {
    while (!done) {
      const { value, done: streamEnded } = await reader.read();
      if (streamEnded) break;
      buffer = parseSseEvents(buffer + decoder.decode(value, { stream: true }), handleData);
    }
  } finally {
    // Close the connection after an error event, so the server stops generating.
    if (!done) reader.cancel().catch(() => {});
  }
  if (!done) throw new ApiError('the stream ended before [DONE]', 0);
  return text;
}

async function sendChat(event) {
  event.preventDefault();
  showError('chat-error', null);
  const input = byId('chat-input');
  const message = input.value.trim();
  if (!message) return;

  conversation.push({ role: 'user', content: message });
  const userEntry = addChatMessage('user', message);
  const entry = addChatMessage('assistant', '');
  const content = entry.querySelector('.chat-content');
  entry.setAttribute('aria-busy', 'true');
  input.value = '';
  chatAbort = new AbortController();
  byId('chat-send').disabled = true;
  byId('chat-stop').disabled = false;

  const body = {
    model: byId('chat-model').value,
    messages: conversation.slice(),
    max_tokens: Number(byId('chat-max-tokens').value),
    temperature: Number(byId('chat-temperature').value),
    stream: true,
  };
  try {
    const text = await streamChat(body, content, entry, chatAbort.signal);
    conversation.push({ role: 'assistant', content: text });
    entry.dataset.state = 'done';
  } catch (error) {
    if (error.name === 'AbortError') {
      conversation.push({ role: 'assistant', content: content.textContent });
      entry.dataset.state = 'stopped';
      entry.append(' (stopped)');
    } else {
      // Leave nothing of a failed request behind, so the message can be sent again.
      conversation.pop();
      userEntry.remove();
      entry.remove();
      input.value = message;
      showError('chat-error', error);
    }
  } finally {
    entry.removeAttribute('aria-busy');
    chatAbort = null;
    byId('chat-send').disabled = false;
    byId('chat-stop').disabled = true;
  }
}

function clearChat() {
  if (chatAbort) chatAbort.abort();
  conversation.length = 0;
  byId('chat-log').replaceChildren();
  showError('chat-error', null);
}

// ---- Latency comparison ------------------------------------------------------------

function plural(count, noun) {
  return `${count} ${noun}${count === 1 ? '' : 's'}`;
}

function formatMilliseconds(seconds) {
  const milliseconds = seconds * 1000;
  return milliseconds >= 100 ? milliseconds.toFixed(0) : milliseconds.toPrecision(3);
}

function drawBars(metric, variants) {
  const names = Object.keys(variants);
  const largest = Math.max(...names.map((name) => variants[name][metric.key].median));
  const list = document.createElement('ul');
  list.className = 'bars';
  list.setAttribute('aria-labelledby', metric.caption);

  for (const name of names) {
    const variant = variants[name];
    const median = variant[metric.key].median;
    const ratio = variant.ratio_to_base ? variant.ratio_to_base[metric.key] : null;
    const ratioText = ratio === null ? 'no base timing' : `${ratio.toFixed(2)}× base`;

    const row = document.createElement('li');
    row.className = 'bar-row';
    row.dataset.variant = name;
    const label = document.createElement('span');
    label.className = 'bar-label';
    label.textContent = name;
    const track = document.createElement('span');
    track.className = 'bar-track';
    const fraction = largest > 0 ? median / largest : 0;
    const bar = document.createElement('span');
    bar.className = `bar bar-${name} ${fraction >= 0.5 ? 'value-inside' : 'value-outside'}`;
    // CSSOM writes are allowed by the page's Content-Security-Policy; style attributes are not.
    bar.style.width = `${100 * fraction}%`;
    const value = document.createElement('span');
    value.className = 'bar-value';
    value.textContent = `${formatMilliseconds(median)} ms, ${ratioText}`;
    bar.append(value);
    track.append(bar);
    row.append(label, track);
    list.append(row);
  }
  byId(metric.chart).replaceChildren(list);
}

async function runLatency(event) {
  event.preventDefault();
  showError('latency-error', null);
  const body = {
    model: byId('latency-model').value,
    prompt_tokens: Number(byId('latency-prompt-tokens').value),
    new_tokens: Number(byId('latency-new-tokens').value),
    repeats: Number(byId('latency-repeats').value),
  };
  const status = byId('latency-status');
  byId('latency-run').disabled = true;
  byId('latency-result').setAttribute('aria-busy', 'true');
  status.textContent = `Timing ${body.model}: loading four variants and running them…`;

  try {
    const result = await apiJson('/latency/compare', { method: 'POST', body });
    for (const metric of LATENCY_METRICS) drawBars(metric, result.variants);
    const machine = result.machine;
    byId('latency-notes').textContent = [
      `${plural(result.prompt_tokens, 'prompt token')}, ` +
        `${plural(result.new_tokens, 'new token')}, ${plural(result.repeats, 'timed run')} ` +
        `after ${plural(result.warmup, 'warm-up run')} per variant; ${result.engine}`,
      `${machine.cpu_model}, ${machine.torch_threads} torch threads`,
      ...result.notes,
    ].join('. ');
    byId('latency-result').hidden = false;
    status.textContent = `Done in ${result.seconds.toFixed(1)} s.`;
  } catch (error) {
    status.textContent = '';
    showError('latency-error', error);
  } finally {
    byId('latency-run').disabled = false;
    byId('latency-result').removeAttribute('aria-busy');
  }
}

// ---- Start -------------------------------------------------------------------------

function start() {
  setUpKeyForm();
  byId('refresh-catalog').addEventListener('click', () => loadCatalog());
  byId('merge-form').addEventListener('submit', submitMerge);
  byId('merge-cancel').addEventListener('click', cancelMerge);
  byId('chat-form').addEventListener('submit', sendChat);
  byId('chat-input').addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      byId('chat-form').requestSubmit();
    }
  });
  byId('chat-stop').addEventListener('click', () => chatAbort && chatAbort.abort());
  byId('chat-clear').addEventListener('click', clearChat);
  byId('latency-form').addEventListener('submit', runLatency);
  loadCatalog();
}

start();
