// API docs: Swagger UI (vendored) over this server's OpenAPI document.
"use strict";

window.addEventListener("DOMContentLoaded", () => {
  const root = document.getElementById("swagger-ui");
  const ui = window.SwaggerUIBundle({
    url: root.dataset.specUrl,
    domNode: root,
    deepLinking: true,
    validatorUrl: null, // no third-party validator badge
    presets: [window.SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    onComplete: () => {
      // The key entered in the playground, if any, authorises "Try it out".
      let key = null;
      try {
        key = JSON.parse(window.localStorage.getItem("imagegenx.apiKey") || "null");
      } catch (err) {
        key = null;
      }
      if (key) ui.preauthorizeApiKey("ApiKey", key);
    },
  });
});
