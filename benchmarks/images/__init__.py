"""Test and benchmark images: built from layer descriptions or Debian packages, pushed to a
registry deterministically (fixed times, sorted entries), so reruns give the same digests."""
