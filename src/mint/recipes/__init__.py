"""Post-training recipes. A recipe is a client of the HTTP API, like any user's script: it
imports the public `tinker` SDK and nothing from mint's server side."""
