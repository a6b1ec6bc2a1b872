/**
 * Rendezvous (highest-random-weight) hashing: every pod gets a score for a key; the pod with the highest
 * score wins. Removing a pod only moves the keys it owned, so each pod's prefix-state cache keeps hitting.
 */

/** 32-bit FNV-1a followed by a murmur3 finaliser (FNV alone mixes the low bits poorly). */
export function hash32(text: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b);
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35);
  h ^= h >>> 16;
  return h >>> 0;
}

/** Pods ordered by descending score for `key` (ties broken by id, so the order is total). */
export function rendezvousOrder<T extends { id: string }>(pods: readonly T[], key: string): T[] {
  return pods
    .map((pod) => ({ pod, score: hash32(`${pod.id}\u0000${key}`) }))
    .sort((a, b) => b.score - a.score || (a.pod.id < b.pod.id ? -1 : 1))
    .map((x) => x.pod);
}

/** The affinity key of a prompt: its first `count` token ids (the part a prefix cache can share). */
export function affinityKey(promptIds: number[] | null, promptText: string, count = 32): string {
  return promptIds ? promptIds.slice(0, count).join(',') : promptText.slice(0, count * 4);
}
