/** Module kinds wrangler bundles besides JS/JSON (see [[rules]] in wrangler.toml). */
declare module '*.wasm' {
  const module: WebAssembly.Module; // CompiledWasm: compiled at upload, instantiated without code generation
  export default module;
}
declare module '*.safetensors' {
  const bytes: ArrayBuffer; // Data rule
  export default bytes;
}
