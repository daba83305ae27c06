// The official OpenAI JS SDK in a browser page (tests/browser/pages/js_sdk.html), bundled by esbuild at install
// time (scripts/install-test-clients.sh). The page's query names the relay and the access key; the test calls
// window.runSdk() and reads what the SDK returned, or the error it threw.
import OpenAI from 'openai';

const params = new URLSearchParams(location.search);

function client() {
  return new OpenAI({
    baseURL: params.get('relay') + '/v1',
    apiKey: params.get('key'),
    dangerouslyAllowBrowser: true,
    maxRetries: 0, // a refused preflight fails at once, not after the SDK's backoff
    timeout: 20_000,
  });
}

function describe(err) {
  return { name: err?.constructor?.name ?? typeof err, message: String(err?.message ?? err), status: err?.status ?? null };
}

async function step(results, name, call) {
  try {
    results[name] = { ok: true, value: await call() };
  } catch (err) {
    results[name] = { ok: false, error: describe(err) };
  }
}

window.runSdk = async (model) => {
  const openai = client();
  const results = {};
  await step(results, 'streamed', async () => {
    const stream = await openai.chat.completions.create({
      model, stream: true, messages: [{ role: 'user', content: 'stream to the page' }],
    });
    const deltas = [];
    for await (const chunk of stream) {
      const content = chunk.choices[0]?.delta?.content;
      if (content) deltas.push(content);
    }
    return { deltas };
  });
  await step(results, 'whole', async () => {
    const completion = await openai.chat.completions.create({
      model, messages: [{ role: 'user', content: 'answer the page at once' }],
    });
    return { content: completion.choices[0].message.content, finishReason: completion.choices[0].finish_reason };
  });
  await step(results, 'models', async () => {
    const ids = [];
    for await (const entry of openai.models.list()) ids.push(entry.id);
    return { ids };
  });
  await step(results, 'response', async () => {
    const response = await openai.responses.create({ model, input: 'respond to the page' });
    return { id: response.id, status: response.status, outputText: response.output_text };
  });
  return { sdkVersion: OpenAI.VERSION ?? null, results };
};
document.body.dataset.ready = 'true';
