// A chat front end's read of Dispatch, with the AI SDK (`ai` on npm) and nothing of ours:
// it POSTs a goal in direct mode (`Accept: text/event-stream`), parses the answer with
// the SDK's own event-stream parser against its UI message chunk schema (a chunk the
// schema refuses fails the read), assembles the message with `readUIMessageStream`, and
// prints the last message as JSON.
//
// Usage: node ai_sdk_reader.mjs URL API_KEY BODY_JSON
import { parseJsonEventStream, readUIMessageStream, uiMessageChunkSchema } from 'ai';

const [url, key, body] = process.argv.slice(2);
const response = await fetch(url, {
  method: 'POST',
  headers: {
    authorization: `Bearer ${key}`,
    accept: 'text/event-stream',
    'content-type': 'application/json',
  },
  body,
});
if (!response.ok) {
  console.error(`${response.status} ${await response.text()}`);
  process.exit(2);
}
const chunks = parseJsonEventStream({
  stream: response.body,
  schema: uiMessageChunkSchema,
}).pipeThrough(
  new TransformStream({
    transform(part, controller) {
      if (!part.success) {
        throw part.error;
      }
      controller.enqueue(part.value);
    },
  }),
);
let last;
for await (const message of readUIMessageStream({
  stream: chunks,
  onError: (error) => {
    throw error;
  },
})) {
  last = message;
}
console.log(JSON.stringify(last));
