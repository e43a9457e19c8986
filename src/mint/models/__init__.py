"""Base provisioning, fingerprints and the LoRA mechanism shared by trainer and engine."""
