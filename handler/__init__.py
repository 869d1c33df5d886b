"""Serverless mode: a RunPod job-queue worker on the same llama-server lifecycle."""
