// Unit tests of the small pieces the routes rely on: key format, constant-time compare, rendezvous hashing,
// the SSE parser for pod streams, settings validation.
import { describe, expect, it } from 'vitest';
import { constantTimeEqual, keyPrefix, newKey, parseKey } from '../../src/auth/keys';
import { affinityKey, rendezvousOrder } from '../../src/routing/rendezvous';
import { readSettings } from '../../src/settings';
import { sseEvents } from '../../src/serve/sse';

describe('keys', () => {
  it('generates parseable keys and rejects malformed ones', () => {
    const { key, keyId } = newKey('acme-2');
    expect(parseKey(key)).toEqual({ tenantId: 'acme-2', keyId });
    expect(keyPrefix(key)).toBe(key.slice(0, `rk_acme-2_${keyId}_`.length + 4));
    for (const bad of ['', 'sk-abc', 'rk_acme', 'rk_acme_abc_secretsecretsecretsecret', 'rk_ACME_abcdefgh_secretsecretsecretsecret', `rk_acme_${keyId}_short`]) {
      expect(parseKey(bad)).toBeNull();
    }
    expect(() => newKey('Bad Tenant')).toThrow(/bad tenant id/);
  });

  it('compares in constant time with the right answer', () => {
    expect(constantTimeEqual('abc', 'abc')).toBe(true);
    expect(constantTimeEqual('abc', 'abd')).toBe(false);
    expect(constantTimeEqual('abc', 'abcd')).toBe(false);
  });
});

describe('rendezvous hashing', () => {
  const pods = ['http://a', 'http://b', 'http://c', 'http://d'].map((id) => ({ id }));
  const keys = Array.from({ length: 2000 }, (_, i) => affinityKey([i, i * 7, 3], ''));

  it('spreads keys evenly', () => {
    const counts = new Map<string, number>();
    for (const k of keys) {
      const top = rendezvousOrder(pods, k)[0].id;
      counts.set(top, (counts.get(top) ?? 0) + 1);
    }
    for (const pod of pods) expect(counts.get(pod.id)! / keys.length).toBeGreaterThan(0.18);
  });

  it('moves only the keys of a removed pod', () => {
    const before = keys.map((k) => rendezvousOrder(pods, k)[0].id);
    const after = keys.map((k) => rendezvousOrder(pods.filter((p) => p.id !== 'http://c'), k)[0].id);
    keys.forEach((_, i) => (before[i] === 'http://c' ? expect(after[i]).not.toBe('http://c') : expect(after[i]).toBe(before[i])));
  });

  it('keys on the leading 32 tokens only', () => {
    const a = Array.from({ length: 40 }, (_, i) => i);
    expect(affinityKey(a, '')).toBe(affinityKey([...a.slice(0, 32), 999], ''));
    expect(affinityKey(null, 'x'.repeat(500))).toHaveLength(128);
  });
});

describe('SSE parser', () => {
  it('reassembles events split at any byte, with CRLF line ends', async () => {
    const text = 'data: {"a":1}\r\n\r\n: comment\n\ndata: {"b":\ndata: data2\n\ndata: [DONE]\n\n';
    const bytes = new TextEncoder().encode(text);
    for (const size of [1, 2, 3, 7, bytes.length]) {
      const stream = new ReadableStream<Uint8Array>({
        start(c) {
          for (let i = 0; i < bytes.length; i += size) c.enqueue(bytes.slice(i, i + size));
          c.close();
        },
      });
      const out: (string | null)[] = [];
      for await (const ev of sseEvents(stream.getReader(), (r) => r.read())) out.push(ev.data);
      expect(out).toEqual(['{"a":1}', null, '{"b":\ndata2', '[DONE]']);
    }
  });
});

describe('settings', () => {
  it('parses defaults and rejects malformed values by name', () => {
    const s = readSettings({ GPU_BACKENDS: 'http://a:1/, http://b:2' });
    expect(s.pods.urls).toEqual(['http://a:1', 'http://b:2']);
    expect(s.defaultMaxTokens).toBe(128);
    expect(() => readSettings({ EDGE_MAX_TOKENS: 'lots' })).toThrow(/EDGE_MAX_TOKENS/);
    expect(() => readSettings({ GPU_BACKENDS: 'not a url' })).toThrow(/GPU_BACKENDS/);
  });
});
