/** Server-sent events: a response whose body is produced by an async function, and a line parser for pod streams. */

const encoder = new TextEncoder();

export const SSE_HEADERS = {
  'content-type': 'text/event-stream; charset=utf-8',
  'cache-control': 'no-cache',
  // Keeps wrangler's local proxy from buffering or compressing the stream.
  'content-encoding': 'identity',
} as const;

export interface SseSink {
  /** Sends `data: <json>` (or a raw string such as `[DONE]`); ignored once the client has gone. */
  send(data: unknown): void;
  /** Sends an already-encoded event (pod pass-through). */
  raw(bytes: Uint8Array): void;
  readonly closed: boolean;
}

/**
 * Streams what `produce` sends. When the client disconnects, `signal` aborts; `produce` keeps running until
 * it has accounted for what was delivered (its promise is kept alive by `waitUntil`).
 */
export function sseResponse(
  produce: (sink: SseSink, signal: AbortSignal) => Promise<void>,
  waitUntil: (p: Promise<unknown>) => void,
  headers: Record<string, string>,
): Response {
  const abort = new AbortController();
  let closed = false;
  const body = new ReadableStream<Uint8Array>({
    start(controller) {
      const sink: SseSink = {
        send(data) {
          if (closed) return;
          controller.enqueue(encoder.encode(`data: ${typeof data === 'string' ? data : JSON.stringify(data)}\n\n`));
        },
        raw(bytes) {
          if (!closed) controller.enqueue(bytes);
        },
        get closed() {
          return closed;
        },
      };
      const run = produce(sink, abort.signal)
        .catch((err) => {
          console.error('stream producer failed', err);
          sink.send({ error: { message: 'Internal error while streaming.', type: 'server_error', param: null, code: 'internal_error' } });
        })
        .finally(() => {
          if (!closed) {
            closed = true;
            controller.close();
          }
        });
      waitUntil(run);
    },
    cancel() {
      closed = true;
      abort.abort();
    },
  });
  return new Response(body, { status: 200, headers: { ...SSE_HEADERS, ...headers } });
}

/** Splits a byte stream into SSE events; yields each event's raw text (without the blank line) and its data payload. */
export async function* sseEvents(
  reader: ReadableStreamDefaultReader<Uint8Array>,
  readChunk: (r: ReadableStreamDefaultReader<Uint8Array>) => Promise<ReadableStreamReadResult<Uint8Array>>,
): AsyncGenerator<{ raw: string; data: string | null }> {
  const decoder = new TextDecoder();
  let buffer = '';
  for (;;) {
    const { value, done } = await readChunk(reader);
    if (done) break;
    // Normalise CRLF on the whole buffer: a CR and its LF may arrive in different chunks.
    buffer = (buffer + decoder.decode(value, { stream: true })).replace(/\r\n/g, '\n');
    let at: number;
    while ((at = buffer.indexOf('\n\n')) >= 0) {
      const raw = buffer.slice(0, at);
      buffer = buffer.slice(at + 2);
      const data = raw
        .split('\n')
        .filter((l) => l.startsWith('data:'))
        .map((l) => l.slice(5).replace(/^ /, ''))
        .join('\n');
      yield { raw, data: data === '' && !raw.includes('data:') ? null : data };
    }
  }
}
