"""The chart ships the Grafana dashboard: with metrics.grafanaDashboard.enabled it renders a
ConfigMap holding exactly helm/trisect/dashboards/trisect-dashboard.json, labelled for Grafana's
dashboard sidecar; by default nothing is rendered."""
import json

from tests.chart.test_chart import CHART, helm, objects  # noqa: F401  (helm: the fixture)


def configmaps(objs):
    return [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-dashboard")]


def test_dashboard_configmap_holds_the_dashboard(helm):
    assert configmaps(objects(helm)) == []
    (cm,) = configmaps(objects(helm, "--set", "metrics.grafanaDashboard.enabled=true"))
    assert cm["metadata"]["namespace"] == "trisect" and cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(cm["data"]["trisect-dashboard.json"])
    assert shipped == json.loads((CHART / "dashboards" / "trisect-dashboard.json").read_text())
    assert shipped["panels"] and all(t["expr"] for p in shipped["panels"] for t in p.get("targets", []))
    (cm,) = configmaps(objects(helm, "--set", "metrics.grafanaDashboard.enabled=true",
                               "--set", "metrics.grafanaDashboard.labels.dashboards=trisect"))
    assert cm["metadata"]["labels"]["dashboards"] == "trisect"     # e.g. a sidecar's own label selector
