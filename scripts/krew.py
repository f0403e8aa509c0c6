"""Fills the krew manifest template (krew-release-bot's `addURIAndSha`) for one archive built
here, and checks the result as krew would: the fields it requires, one platform per
os/arch, a sha256 that is the archive's, and the `bin` it names inside the archive.

    python3 scripts/krew.py TEMPLATE TAG OS-ARCH ARCHIVE > manifest.yaml
"""

import hashlib
import re
import sys
import tarfile

import yaml

template, tag, platform, archive = sys.argv[1:5]
text = open(template).read().replace("{{ .TagName }}", tag)
sha = hashlib.sha256(open(archive, "rb").read()).hexdigest()


def fill(m):
    uri = m.group(1)
    indent = m.group(0)[: len(m.group(0)) - len(m.group(0).lstrip())]
    if uri.endswith(f"-{platform}.tar.gz"):
        return f"{indent}uri: file://{archive}\n{indent}sha256: \"{sha}\""
    # Another platform's archive is not built here: its entry keeps the release URI and a
    # sha256 that can never match, so that no one installs it from this manifest.
    return f"{indent}uri: {uri}\n{indent}sha256: \"{'0' * 64}\""


text = re.sub(r'^[ \t]*\{\{\s*addURIAndSha "([^"]+)" \.TagName\s*\}\}', fill, text, flags=re.M)
if "{{" in text:
    sys.exit(f"{template}: a template field is left: {text[text.index('{{'):][:60]}")

# The checks krew's validation makes (pkg/index/validation), on the filled manifest.
doc = yaml.safe_load(text)
assert doc["apiVersion"] == "krew.googlecontainertools.github.com/v1alpha2", doc["apiVersion"]
assert doc["kind"] == "Plugin" and re.fullmatch(r"[a-z0-9][a-z0-9-]*", doc["metadata"]["name"])
spec = doc["spec"]
assert re.fullmatch(r"v\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?", spec["version"]), spec["version"]
assert spec["shortDescription"] and len(spec["shortDescription"]) <= 50 and spec["homepage"].startswith("https://")
seen = set()
for p in spec["platforms"]:
    labels = p["selector"]["matchLabels"]
    key = (labels["os"], labels["arch"])
    assert key not in seen, f"two platforms for {key}"
    seen.add(key)
    assert re.fullmatch(r"[a-f0-9]{64}", p["sha256"]) and p["uri"] and p["bin"] == "kubectl-etcd_medic"
assert ("linux", platform.split("-")[1]) in seen, f"{platform} is not among the manifest's platforms"
print(f"krew manifest: platforms {sorted(seen)}; {platform} filled from {archive}", file=sys.stderr)
with tarfile.open(archive) as t:
    names = t.getnames()
    assert "kubectl-etcd_medic" in names, names
    assert t.getmember("kubectl-etcd_medic").mode & 0o111, "the plugin is executable"
print(text, end="")
