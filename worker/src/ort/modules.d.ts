/** The exported step graph bundled as an ArrayBuffer module (wrangler.toml [[rules]] type "Data", "**\/*.onnx"). */
declare module '*.onnx' {
  const bytes: ArrayBuffer;
  export default bytes;
}
