// Command apiextensions-apiserver is Kubernetes' standalone API server for custom resources
// (k8s.io/apiextensions-apiserver/pkg/cmd/server), changed so that ordinary clients can use it on its
// own, without a kube-apiserver in front. scripts/apiserver.sh builds it (GOPATH mode, from Debian's
// golang-*-dev packages) and starts it; see there for the flags it is given.
//
// Upstream runs this server as the delegate behind kube-apiserver, which serves discovery and OpenAPI
// for it. Standalone, it therefore answers neither, and kubectl and kube-rs find no resources. This
// command differs from upstream's in four places:
//
//  1. discovery on: /apis lists every group (apiextensions.k8s.io and the groups of the established
//     CRDs), in the aggregated form too; /apis/GROUP and /apis/GROUP/VERSION were already served.
//  2. /api answers an empty APIVersions: there is no core group here, but clients read /api first.
//     Paths below /api answer a 404 Status (reason NotFound), as kube-apiserver does for a resource it
//     does not serve, where upstream's answer is a JSON list of the server's paths.
//  3. OpenAPI v2 and v3 are configured, so the CRD OpenAPI controllers run and publish the CRDs'
//     schemas (kubectl explain, kubectl's client-side checks).
//  4. delegated authentication and authorization need no kube-apiserver: client certificates are
//     checked against --client-ca-file, and the group system:masters may do anything (everyone else
//     nothing, except /healthz, /readyz and /livez).
//
// What it serves is the group apiextensions.k8s.io and custom resources; everything else (ConfigMaps,
// Secrets, Deployments, the core group) answers 404.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"sort"

	"github.com/spf13/cobra"

	"k8s.io/apiextensions-apiserver/pkg/apihelpers"
	crdv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	extensionsapiserver "k8s.io/apiextensions-apiserver/pkg/apiserver"
	"k8s.io/apiextensions-apiserver/pkg/cmd/server/options"
	generatedopenapi "k8s.io/apiextensions-apiserver/pkg/generated/openapi"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/apimachinery/pkg/version"
	openapinamer "k8s.io/apiserver/pkg/endpoints/openapi"
	genericapiserver "k8s.io/apiserver/pkg/server"
	"k8s.io/apiserver/pkg/util/openapi"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/cache"
	"k8s.io/component-base/cli"
	"k8s.io/klog/v2"
)

func main() {
	ctx := genericapiserver.SetupSignalContext()
	os.Exit(cli.Run(newCommand(ctx)))
}

// newCommand is upstream's NewServerCommand (pkg/cmd/server/server.go) with run below in place of Run.
func newCommand(ctx context.Context) *cobra.Command {
	o := options.NewCustomResourceDefinitionsServerOptions(os.Stdout, os.Stderr)

	// (4) Without --authentication-kubeconfig/--authorization-kubeconfig (and outside a cluster), go on
	// without token and subject-access reviews instead of failing, and don't look for the
	// extension-apiserver-authentication ConfigMap of a kube-apiserver that isn't there.
	o.RecommendedOptions.Authentication.RemoteKubeConfigFileOptional = true
	o.RecommendedOptions.Authentication.SkipInClusterLookup = true
	o.RecommendedOptions.Authorization.RemoteKubeConfigFileOptional = true

	cmd := &cobra.Command{
		Use:   "apiextensions-apiserver",
		Short: "Launch a standalone API server for custom resources",
		PersistentPreRunE: func(*cobra.Command, []string) error {
			return o.ServerRunOptions.ComponentGlobalsRegistry.Set()
		},
		RunE: func(c *cobra.Command, _ []string) error {
			if o.RecommendedOptions.CoreAPI.CoreAPIKubeconfigPath == "" {
				// Upstream takes the in-cluster config then, and fails outside a cluster.
				return fmt.Errorf("--kubeconfig is required: a kubeconfig for this server itself " +
					"(the generic server's informers of the core API read through it; they find nothing)")
			}
			if err := o.Complete(); err != nil {
				return err
			}
			if err := o.Validate(); err != nil {
				return err
			}
			return run(c.Context(), o)
		},
	}
	cmd.SetContext(ctx)
	o.AddFlags(cmd.Flags())
	return cmd
}

// run is upstream's Run (pkg/cmd/server/server.go) with the changes (1), (2) and (3).
func run(ctx context.Context, o *options.CustomResourceDefinitionsServerOptions) error {
	config, err := o.Config()
	if err != nil {
		return err
	}

	// (3) Config sets the OpenAPI v3 config only; v2 as upstream's test server does (testing/testserver.go),
	// with the same definitions and namer as v3.
	getDefinitions := openapi.GetOpenAPIDefinitionsWithoutDisabledFeatures(generatedopenapi.GetOpenAPIDefinitions)
	namer := openapinamer.NewDefinitionNamer(extensionsapiserver.Scheme, scheme.Scheme)
	config.GenericConfig.OpenAPIConfig = genericapiserver.DefaultOpenAPIConfig(getDefinitions, namer)
	config.GenericConfig.OpenAPIConfig.Info.Title = "apiextensions-apiserver"
	config.GenericConfig.OpenAPIV3Config.Info.Title = "apiextensions-apiserver"

	completed := config.Complete()
	// (1) Complete turns discovery off (kube-apiserver's aggregator serves it in a cluster): on again.
	completed.GenericConfig.EnableDiscovery = true

	server, err := completed.New(genericapiserver.NewEmptyDelegate())
	if err != nil {
		return err
	}
	generic := server.GenericAPIServer

	// (2) The core group's root: no versions; below it, a NotFound Status for every path.
	generic.Handler.NonGoRestfulMux.Handle("/api", http.HandlerFunc(serveCoreAPI))
	generic.Handler.NonGoRestfulMux.HandlePrefix("/api/", http.HandlerFunc(serveCoreAPI))

	// (1) The aggregated /apis already lists the CRDs' groups (the CRD discovery controller adds them);
	// the unaggregated /apis lists only the groups the generic server installed. Keep the CRDs' groups
	// in it too, as kube-apiserver's aggregator would.
	crds := server.Informers.Apiextensions().V1().CustomResourceDefinitions()
	groups := &crdGroups{lister: crds.Lister().List, manager: generic.DiscoveryGroupManager, listed: sets.New[string]()}
	if _, err := crds.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { groups.sync() },
		UpdateFunc: func(any, any) { groups.sync() },
		DeleteFunc: func(any) { groups.sync() },
	}); err != nil {
		return err
	}

	return generic.PrepareRun().RunWithContext(ctx)
}

// serveCoreAPI answers /api with an APIVersions that lists no version, and every path below it
// (/api/v1/namespaces/NS/secrets/NAME, ...) with the 404 Status a kube-apiserver gives for a resource it
// does not serve, instead of the generic server's list of paths: clients read the reason (NotFound) and
// message from it.
func serveCoreAPI(w http.ResponseWriter, req *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	if req.URL.Path == "/api" || req.URL.Path == "/api/" {
		_ = json.NewEncoder(w).Encode(&metav1.APIVersions{
			TypeMeta: metav1.TypeMeta{Kind: "APIVersions"},
			Versions: []string{},
			ServerAddressByClientCIDRs: []metav1.ServerAddressByClientCIDR{
				{ClientCIDR: "0.0.0.0/0", ServerAddress: req.Host},
			},
		})
		return
	}
	w.WriteHeader(http.StatusNotFound)
	_ = json.NewEncoder(w).Encode(&metav1.Status{
		TypeMeta: metav1.TypeMeta{Kind: "Status", APIVersion: "v1"},
		Status:   metav1.StatusFailure,
		Message:  "the server could not find the requested resource (this server serves no core API: " + req.URL.Path + ")",
		Reason:   metav1.StatusReasonNotFound,
		Details:  &metav1.StatusDetails{},
		Code:     http.StatusNotFound,
	})
}

// crdGroups writes the groups of the established CRDs into the unaggregated /apis. Called from the CRD
// informer's handler, one call at a time.
type crdGroups struct {
	lister  func(labels.Selector) ([]*crdv1.CustomResourceDefinition, error)
	manager interface {
		AddGroup(metav1.APIGroup)
		RemoveGroup(string)
	}
	listed sets.Set[string] // the groups this added, to remove when their last CRD goes
}

func (g *crdGroups) sync() {
	list, err := g.lister(labels.Everything())
	if err != nil {
		klog.ErrorS(err, "listing CRDs for discovery")
		return
	}
	versions := map[string]sets.Set[string]{}
	for _, crd := range list {
		if !apihelpers.IsCRDConditionTrue(crd, crdv1.Established) {
			continue
		}
		for _, v := range crd.Spec.Versions {
			if !v.Served {
				continue
			}
			if versions[crd.Spec.Group] == nil {
				versions[crd.Spec.Group] = sets.New[string]()
			}
			versions[crd.Spec.Group].Insert(v.Name)
		}
	}
	for group, names := range versions {
		ordered := sets.List(names)
		// Kubernetes' order (v2 > v1 > v1beta2 > v1alpha1 > others): the first is the preferred version.
		sort.Slice(ordered, func(i, j int) bool {
			return version.CompareKubeAwareVersionStrings(ordered[i], ordered[j]) > 0
		})
		apiGroup := metav1.APIGroup{Name: group}
		for _, v := range ordered {
			apiGroup.Versions = append(apiGroup.Versions, metav1.GroupVersionForDiscovery{GroupVersion: group + "/" + v, Version: v})
		}
		apiGroup.PreferredVersion = apiGroup.Versions[0]
		g.manager.AddGroup(apiGroup)
		g.listed.Insert(group)
	}
	for group := range g.listed {
		if _, ok := versions[group]; !ok {
			g.manager.RemoveGroup(group)
			g.listed.Delete(group)
		}
	}
}
